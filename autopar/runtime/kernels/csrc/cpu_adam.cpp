// AdamW step on the CPU, for optimizer states offloaded to host memory (autopar.runtime.zero).
//
// One call updates every parameter of a group in place with torch.optim.AdamW's arithmetic
// (amsgrad=False, maximize=False), in fp32:
//   p <- p * (1 - lr * weight_decay)
//   m <- lerp(m, g, 1 - beta1)
//   v <- v * beta2 + (1 - beta2) * g * g
//   p <- p - lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
// The scalar coefficients are computed in double and rounded to float once, as torch does.
// The elements of all tensors are cut into fixed-size chunks that one OpenMP loop shares among
// the threads; each chunk runs a SIMD loop, compiled for AVX-512, AVX2 and the baseline ISA
// (picked at load time), so the cached build runs on any x86-64 host.
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

struct Coeffs {
  float decay;      // 1 - lr * weight_decay
  float w1;         // 1 - beta1: lerp weight of the gradient in the first moment
  float beta2;
  float w2;         // 1 - beta2
  float step_size;  // -lr / (1 - beta1^step)
  float bc2_sqrt;   // sqrt(1 - beta2^step)
  float eps;
};

constexpr int64_t kChunk = 1 << 16;  // elements per work item: 256 KiB of each fp32 stream

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void adamw_span(float* __restrict p, const float* __restrict g, float* __restrict m,
                float* __restrict v, int64_t n, Coeffs c) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i];
    const float pi = p[i] * c.decay;
    const float mi = m[i] + c.w1 * (gi - m[i]);
    const float vi = v[i] * c.beta2 + c.w2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi + c.step_size * mi / (std::sqrt(vi) / c.bc2_sqrt + c.eps);
  }
}

void check(const std::vector<at::Tensor>& ts, const std::vector<at::Tensor>& params, const char* what) {
  TORCH_CHECK(ts.size() == params.size(), "cpu_adamw_step: ", ts.size(), " ", what, " for ",
              params.size(), " parameters");
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor& t = ts[i];
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
                "cpu_adamw_step: ", what, "[", i, "] must be a contiguous fp32 CPU tensor, got ",
                t.scalar_type(), " on ", t.device(), t.is_contiguous() ? "" : " (not contiguous)");
    TORCH_CHECK(t.numel() == params[i].numel(), "cpu_adamw_step: ", what, "[", i, "] has ", t.numel(),
                " elements, its parameter ", params[i].numel());
  }
}

void adamw_step(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs, int64_t step,
                double lr, double beta1, double beta2, double eps, double weight_decay) {
  TORCH_CHECK(step >= 1, "cpu_adamw_step: step counts from 1, got ", step);
  check(params, params, "params");
  check(grads, params, "grads");
  check(exp_avgs, params, "exp_avgs");
  check(exp_avg_sqs, params, "exp_avg_sqs");
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  const Coeffs c{static_cast<float>(1.0 - lr * weight_decay),
                 static_cast<float>(1.0 - beta1),
                 static_cast<float>(beta2),
                 static_cast<float>(1.0 - beta2),
                 static_cast<float>(-(lr / bc1)),
                 static_cast<float>(std::sqrt(bc2)),
                 static_cast<float>(eps)};

  std::vector<std::pair<int64_t, int64_t>> chunks;  // (tensor index, first element)
  for (size_t t = 0; t < params.size(); ++t) {
    for (int64_t start = 0; start < params[t].numel(); start += kChunk) {
      chunks.emplace_back(static_cast<int64_t>(t), start);
    }
  }
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads()) if (n_chunks > 1)
  for (int64_t k = 0; k < n_chunks; ++k) {
    const auto [t, start] = chunks[k];
    const int64_t n = std::min(kChunk, params[t].numel() - start);
    adamw_span(params[t].data_ptr<float>() + start, grads[t].data_ptr<float>() + start,
               exp_avgs[t].data_ptr<float>() + start, exp_avg_sqs[t].data_ptr<float>() + start, n, c);
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("adamw_step", &adamw_step, "AdamW step, in place, on lists of contiguous fp32 CPU tensors",
        py::call_guard<py::gil_scoped_release>(), py::arg("params"), py::arg("grads"),
        py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("step"), py::arg("lr"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"));
}
