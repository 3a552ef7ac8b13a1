"""Session setup shared by all tests."""

import os

import torch

# @triton.jit picks the CPU interpreter when a kernel is decorated, i.e. when autopar is first imported,
# so it must be set here, before any test module imports autopar; only without CUDA.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
