// The dtypes the kernels of this folder take: fp32, fp16 and bf16 (math in fp32).
#pragma once
#include <ATen/Dispatch.h>

#define AUTOPAR_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)   \
  AT_DISPATCH_SWITCH(TYPE, NAME,                            \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
