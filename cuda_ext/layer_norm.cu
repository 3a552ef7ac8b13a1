// LayerNorm over the last dimension on CUDA, forward and backward, fp32 math for fp32, fp16 and
// bf16 inputs (weight and bias in the input's dtype, bias optional).
//
// The input is seen as rows of D elements (x: N x D, contiguous).
// Forward, one thread block per row: mean, rstd = 1 / sqrt(var + eps) (biased variance, two
//   passes over the row), y = (x - mean) * rstd * weight + bias; mean and rstd are kept (fp32, N)
//   for backward.
// Backward: dx per row as above, with xhat = (x - mean) * rstd and g = dy * weight:
//   dx = rstd * (g - mean_j(g) - xhat * mean_j(g * xhat));
//   dweight = sum_rows(dy * xhat), dbias = sum_rows(dy): 32-column x 8-row tiles sum a stripe
//   of rows each into fp32 partial sums, and a second kernel adds the stripes up.
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "dispatch.h"

#include <algorithm>
#include <optional>
#include <vector>

namespace {

constexpr int kTileRows = 8;       // rows of one tile of the dweight/dbias kernel (32 columns)
constexpr int kMaxStripes = 128;   // row stripes that dweight/dbias are summed in

// Sum of v over the thread block (blockDim.x a multiple of 32); every thread gets the sum.
__device__ float block_sum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (blockDim.x >> 5) ? shared[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  const float total = shared[0];
  __syncthreads();  // shared is reused by the next call
  return total;
}

template <typename T>
__global__ void layer_norm_fwd_kernel(const T* __restrict x, const T* __restrict weight,
                                      const T* __restrict bias, T* __restrict y, float* __restrict mean_out,
                                      float* __restrict rstd_out, int64_t D, float eps) {
  __shared__ float shared[32];
  const T* xr = x + blockIdx.x * D;
  T* yr = y + blockIdx.x * D;
  float s = 0.f;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) s += static_cast<float>(xr[j]);
  const float mean = block_sum(s, shared) / static_cast<float>(D);
  float sq = 0.f;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const float d = static_cast<float>(xr[j]) - mean;
    sq += d * d;
  }
  const float rstd = rsqrtf(block_sum(sq, shared) / static_cast<float>(D) + eps);
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    float h = (static_cast<float>(xr[j]) - mean) * rstd * static_cast<float>(weight[j]);
    if (bias != nullptr) h += static_cast<float>(bias[j]);
    yr[j] = static_cast<T>(h);
  }
  if (threadIdx.x == 0) {
    mean_out[blockIdx.x] = mean;
    rstd_out[blockIdx.x] = rstd;
  }
}

template <typename T>
__global__ void layer_norm_bwd_dx_kernel(const T* __restrict dy, const T* __restrict x,
                                         const T* __restrict weight, const float* __restrict mean,
                                         const float* __restrict rstd, T* __restrict dx, int64_t D) {
  __shared__ float shared[32];
  const T* dyr = dy + blockIdx.x * D;
  const T* xr = x + blockIdx.x * D;
  T* dxr = dx + blockIdx.x * D;
  const float mu = mean[blockIdx.x];
  const float rs = rstd[blockIdx.x];
  float sum_g = 0.f;
  float sum_gx = 0.f;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const float g = static_cast<float>(dyr[j]) * static_cast<float>(weight[j]);
    sum_g += g;
    sum_gx += g * (static_cast<float>(xr[j]) - mu) * rs;
  }
  const float mean_g = block_sum(sum_g, shared) / static_cast<float>(D);
  const float mean_gx = block_sum(sum_gx, shared) / static_cast<float>(D);
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const float g = static_cast<float>(dyr[j]) * static_cast<float>(weight[j]);
    const float xhat = (static_cast<float>(xr[j]) - mu) * rs;
    dxr[j] = static_cast<T>(rs * (g - mean_g - xhat * mean_gx));
  }
}

// Block (32, kTileRows); grid (columns / 32, stripes). Writes stripe sums part_w/part_b[stripe][D].
template <typename T>
__global__ void layer_norm_bwd_params_kernel(const T* __restrict dy, const T* __restrict x,
                                             const float* __restrict mean, const float* __restrict rstd,
                                             float* __restrict part_w, float* __restrict part_b, int64_t N,
                                             int64_t D) {
  __shared__ float sw[kTileRows][33];
  __shared__ float sb[kTileRows][33];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float acc_w = 0.f;
  float acc_b = 0.f;
  if (col < D) {
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * kTileRows + threadIdx.y; r < N;
         r += static_cast<int64_t>(gridDim.y) * kTileRows) {
      const float g = static_cast<float>(dy[r * D + col]);
      acc_w += g * (static_cast<float>(x[r * D + col]) - mean[r]) * rstd[r];
      acc_b += g;
    }
  }
  sw[threadIdx.y][threadIdx.x] = acc_w;
  sb[threadIdx.y][threadIdx.x] = acc_b;
  __syncthreads();
  if (threadIdx.y == 0 && col < D) {
    for (int k = 1; k < kTileRows; ++k) {
      acc_w += sw[k][threadIdx.x];
      acc_b += sb[k][threadIdx.x];
    }
    part_w[blockIdx.y * D + col] = acc_w;
    part_b[blockIdx.y * D + col] = acc_b;
  }
}

template <typename T>
__global__ void layer_norm_bwd_params_sum_kernel(const float* __restrict part_w,
                                                 const float* __restrict part_b, int stripes, int64_t D,
                                                 T* __restrict dweight, T* __restrict dbias) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= D) return;
  float w = 0.f;
  float b = 0.f;
  for (int s = 0; s < stripes; ++s) {
    w += part_w[s * D + col];
    b += part_b[s * D + col];
  }
  dweight[col] = static_cast<T>(w);
  dbias[col] = static_cast<T>(b);
}

// Threads per row: about 4 elements each, a multiple of 32, at most 1024.
int row_threads(int64_t D) {
  const int64_t warps = (D + 127) / 128;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(warps, 1), 32) * 32);
}

void check_rows(const at::Tensor& t, const at::Tensor& x, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device() && t.scalar_type() == x.scalar_type() &&
                  t.is_contiguous() && t.sizes() == x.sizes(),
              "layer_norm: ", what, " must be a contiguous ", x.scalar_type(), " tensor of shape ", x.sizes(),
              " on ", x.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

void check_vector(const at::Tensor& t, const at::Tensor& x, const char* what) {
  TORCH_CHECK(t.device() == x.device() && t.scalar_type() == x.scalar_type() && t.is_contiguous() &&
                  t.dim() == 1 && t.size(0) == x.size(1),
              "layer_norm: ", what, " must be a contiguous ", x.scalar_type(), " vector of ", x.size(1),
              " elements on ", x.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

void check_input(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous() && x.size(1) > 0,
              "layer_norm: x must be a contiguous CUDA tensor of shape (rows, D > 0), got ", x.sizes(), " on ",
              x.device());
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "layer_norm: x must be fp32, fp16 or bf16, got ", dtype);
}

}  // namespace

std::vector<at::Tensor> layer_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, double eps) {
  check_input(x);
  check_vector(weight, x, "weight");
  if (bias.has_value()) check_vector(*bias, x, "bias");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0);
  const int64_t D = x.size(1);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({N}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({N}, x.options().dtype(at::kFloat));
  if (N == 0) return {y, mean, rstd};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AUTOPAR_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "layer_norm_fwd", [&] {
    layer_norm_fwd_kernel<scalar_t><<<N, row_threads(D), 0, stream>>>(
        x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
        bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
        mean.data_ptr<float>(), rstd.data_ptr<float>(), D, static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

std::vector<at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                       const at::Tensor& mean, const at::Tensor& rstd) {
  check_input(x);
  check_rows(dy, x, "dy");
  check_vector(weight, x, "weight");
  const int64_t N = x.size(0);
  const int64_t D = x.size(1);
  for (const at::Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK(t->device() == x.device() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                    t->numel() == N,
                "layer_norm: mean and rstd must be contiguous fp32 tensors of ", N, " elements on ",
                x.device());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  at::Tensor dweight = at::empty_like(weight);
  at::Tensor dbias = at::empty_like(weight);
  if (N == 0) return {dx, dweight.zero_(), dbias.zero_()};
  const int stripes = static_cast<int>(std::min<int64_t>((N + kTileRows - 1) / kTileRows, kMaxStripes));
  at::Tensor part_w = at::empty({stripes, D}, x.options().dtype(at::kFloat));
  at::Tensor part_b = at::empty({stripes, D}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AUTOPAR_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "layer_norm_bwd", [&] {
    layer_norm_bwd_dx_kernel<scalar_t><<<N, row_threads(D), 0, stream>>>(
        dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), mean.data_ptr<float>(),
        rstd.data_ptr<float>(), dx.data_ptr<scalar_t>(), D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 tile(32, kTileRows);
    const dim3 grid(static_cast<unsigned>((D + 31) / 32), static_cast<unsigned>(stripes));
    layer_norm_bwd_params_kernel<scalar_t><<<grid, tile, 0, stream>>>(
        dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
        part_w.data_ptr<float>(), part_b.data_ptr<float>(), N, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const unsigned col_blocks = static_cast<unsigned>((D + 255) / 256);
    layer_norm_bwd_params_sum_kernel<scalar_t><<<col_blocks, 256, 0, stream>>>(
        part_w.data_ptr<float>(), part_b.data_ptr<float>(), stripes, D, dweight.data_ptr<scalar_t>(),
        dbias.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, dweight, dbias};
}
