// Fused AdamW step on CUDA: torch.optim.AdamW's arithmetic (amsgrad=False, maximize=False) in
// fp32 registers, for fp32, fp16 or bf16 parameters whose gradient and moments share their dtype.
//
// Multi-tensor launch: each launch covers up to kMaxTensors tensors cut into chunks of kChunk
// elements, one thread block per chunk; the tensors' addresses and the block -> (tensor, chunk)
// map travel in the kernel's parameters (under the 4 KiB limit), so a whole parameter group
// takes a few launches instead of one per tensor.
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "dispatch.h"

#include <cmath>
#include <vector>

namespace {

constexpr int kMaxTensors = 36;
constexpr int kMaxBlocks = 320;
constexpr int kChunk = 65536;  // elements per thread block
constexpr int kThreads = 512;
constexpr int kIlp = 4;        // elements in flight per thread

struct Batch {
  void* ptrs[4][kMaxTensors];  // params, grads, exp_avgs, exp_avg_sqs
  int64_t sizes[kMaxTensors];
  unsigned char block_tensor[kMaxBlocks];
  int block_chunk[kMaxBlocks];
};
static_assert(sizeof(Batch) < 4000, "kernel parameters are limited to 4 KiB");

struct Coeffs {
  float decay;      // 1 - lr * weight_decay
  float w1;         // 1 - beta1
  float beta2;
  float w2;         // 1 - beta2
  float step_size;  // -lr / (1 - beta1^step)
  float bc2_sqrt;   // sqrt(1 - beta2^step)
  float eps;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) adamw_kernel(Batch batch, Coeffs c) {
  const int t = batch.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(batch.block_chunk[blockIdx.x]) * kChunk;
  const int64_t n = min(batch.sizes[t] - start, static_cast<int64_t>(kChunk));
  T* p = static_cast<T*>(batch.ptrs[0][t]) + start;
  const T* g = static_cast<const T*>(batch.ptrs[1][t]) + start;
  T* m = static_cast<T*>(batch.ptrs[2][t]) + start;
  T* v = static_cast<T*>(batch.ptrs[3][t]) + start;
  for (int64_t base = 0; base < n; base += static_cast<int64_t>(blockDim.x) * kIlp) {
    float rp[kIlp], rg[kIlp], rm[kIlp], rv[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (i < n) {
        rp[k] = static_cast<float>(p[i]);
        rg[k] = static_cast<float>(g[i]);
        rm[k] = static_cast<float>(m[i]);
        rv[k] = static_cast<float>(v[i]);
      }
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (i < n) {
        const float mi = rm[k] + c.w1 * (rg[k] - rm[k]);
        const float vi = rv[k] * c.beta2 + c.w2 * rg[k] * rg[k];
        const float pi = rp[k] * c.decay + c.step_size * mi / (sqrtf(vi) / c.bc2_sqrt + c.eps);
        p[i] = static_cast<T>(pi);
        m[i] = static_cast<T>(mi);
        v[i] = static_cast<T>(vi);
      }
    }
  }
}

template <typename T>
void launch_all(const std::vector<std::vector<at::Tensor>>& lists, const Coeffs& c) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Batch batch;
  int n_tensors = 0;
  int n_blocks = 0;
  auto launch = [&]() {
    if (n_blocks > 0) {
      adamw_kernel<T><<<n_blocks, kThreads, 0, stream>>>(batch, c);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    n_tensors = 0;
    n_blocks = 0;
  };
  const std::vector<at::Tensor>& params = lists[0];
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t numel = params[t].numel();
    const int64_t n_chunks = (numel + kChunk - 1) / kChunk;
    for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
      if (n_blocks == kMaxBlocks || (chunk == 0 && n_tensors == kMaxTensors)) launch();
      if (chunk == 0 || n_blocks == 0) {  // the tensor enters this launch
        for (int l = 0; l < 4; ++l) batch.ptrs[l][n_tensors] = lists[l][t].data_ptr();
        batch.sizes[n_tensors] = numel;
        ++n_tensors;
      }
      batch.block_tensor[n_blocks] = static_cast<unsigned char>(n_tensors - 1);
      batch.block_chunk[n_blocks] = static_cast<int>(chunk);
      ++n_blocks;
    }
  }
  launch();
}

}  // namespace

void cuda_adamw_step(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                     std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs, int64_t step,
                     double lr, double beta1, double beta2, double eps, double weight_decay) {
  TORCH_CHECK(step >= 1, "cuda_adamw_step: step counts from 1, got ", step);
  if (params.empty()) return;
  const std::vector<std::vector<at::Tensor>> lists{params, grads, exp_avgs, exp_avg_sqs};
  const char* names[4] = {"params", "grads", "exp_avgs", "exp_avg_sqs"};
  const at::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "cuda_adamw_step: parameters must be fp32, fp16 or bf16, got ", dtype);
  for (int l = 0; l < 4; ++l) {
    TORCH_CHECK(lists[l].size() == params.size(), "cuda_adamw_step: ", lists[l].size(), " ", names[l],
                " for ", params.size(), " parameters");
    for (size_t t = 0; t < params.size(); ++t) {
      const at::Tensor& x = lists[l][t];
      TORCH_CHECK(x.device() == params[0].device() && x.scalar_type() == dtype && x.is_contiguous() &&
                      x.numel() == params[t].numel(),
                  "cuda_adamw_step: ", names[l], "[", t, "] must be a contiguous ", dtype, " tensor of ",
                  params[t].numel(), " elements on ", params[0].device(), ", got ", x.scalar_type(), " of ",
                  x.numel(), " on ", x.device());
    }
  }
  TORCH_CHECK(params[0].is_cuda(), "cuda_adamw_step: tensors must be on a CUDA device, got ",
              params[0].device());
  const c10::cuda::CUDAGuard guard(params[0].device());
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  const Coeffs c{static_cast<float>(1.0 - lr * weight_decay),
                 static_cast<float>(1.0 - beta1),
                 static_cast<float>(beta2),
                 static_cast<float>(1.0 - beta2),
                 static_cast<float>(-(lr / bc1)),
                 static_cast<float>(std::sqrt(bc2)),
                 static_cast<float>(eps)};
  AUTOPAR_DISPATCH_FLOAT_HALF_BF16(dtype, "cuda_adamw_step",
                                  [&] { launch_all<scalar_t>(lists, c); });
}
