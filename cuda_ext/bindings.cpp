// Python bindings of the CUDA kernels in this folder: the module autopar._cuda_ext when built by
// `BUILD_EXT=1 pip install --no-build-isolation .`, or the one autopar.runtime.kernels.cuda_ext builds.
#include <torch/extension.h>

#include <optional>
#include <vector>

void cuda_adamw_step(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                     std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs, int64_t step,
                     double lr, double beta1, double beta2, double eps, double weight_decay);

std::vector<at::Tensor> layer_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, double eps);

std::vector<at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                       const at::Tensor& mean, const at::Tensor& rstd);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("adamw_step", &cuda_adamw_step,
        "AdamW step, in place, on lists of contiguous CUDA tensors of one dtype (fp32, fp16, bf16)",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("step"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"));
  m.def("layer_norm_fwd", &layer_norm_fwd, "LayerNorm of rows: (y, mean, rstd)", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("layer_norm_bwd", &layer_norm_bwd, "LayerNorm backward: (dx, dweight, dbias)", py::arg("dy"),
        py::arg("x"), py::arg("weight"), py::arg("mean"), py::arg("rstd"));
}
