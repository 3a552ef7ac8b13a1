"""AdamW whose step runs fused kernels: torch.optim.AdamW's update and state, faster.

Per step the parameters with a gradient are grouped by (kernel, device, dtype, step count),
and each group is updated by one call on the local tensors (a DTensor's shard, else the
tensor itself):

- on CUDA: the Triton kernel (:func:`autopar.runtime.kernels.adamw.adamw_step`), or the CUDA
  C++ one (:mod:`autopar.runtime.kernels.cuda_ext`) with ``backend="cuda_ext"``;
- on the CPU, for contiguous fp32 tensors (what an offloaded parameter's state is, see
  :mod:`autopar.runtime.zero`): the C++ CPU Adam (:mod:`autopar.runtime.kernels.cpu_adam`),
  compiled on first use; with ``backend="auto"`` a failed build warns once and the torch
  update runs instead;
- ``backend="torch"``, and any tensor no kernel takes (non-contiguous, other dtypes or
  devices): ``torch._foreach_*`` ops, the arithmetic of ``torch.optim.AdamW(foreach=True)``.

The state of each parameter is torch.optim.AdamW's: ``step`` (a float32 scalar tensor),
``exp_avg`` and ``exp_avg_sq`` (``zeros_like`` the parameter, so a DTensor parameter's moments
are DTensors of its layout, and a distributed checkpoint saves them sharded); the param groups
have its keys. So either optimizer loads the other's ``state_dict``.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from autopar.errors import AutoparError, KernelError
from autopar.runtime.zero import plain

BACKENDS = ("auto", "triton", "cuda_ext", "torch")
#: what the device kernels take (fp32 math); other dtypes get the torch update
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel updates: a DTensor's local shard, else ``t``."""
    return plain(t._local_tensor) if isinstance(t, DTensor) else t


def _check_group(group: dict[str, Any]) -> None:
    """Reject what this optimizer does not implement (also in a loaded state_dict)."""
    for flag in ("amsgrad", "maximize", "capturable", "differentiable"):
        if group.get(flag, False):
            raise AutoparError(
                f"autopar.optim.AdamW does not support {flag}=True; use torch.optim.AdamW for it"
            )
    if not group.get("decoupled_weight_decay", True):
        raise AutoparError(
            "autopar.optim.AdamW decays weights decoupled (AdamW); this group has "
            "decoupled_weight_decay=False (torch.optim.Adam's L2 penalty): use torch.optim.Adam for it"
        )


class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW (amsgrad, maximize and capturable off) with fused kernels.

    ``backend``: ``"auto"`` (Triton on CUDA, C++ on the CPU, torch where neither runs),
    ``"triton"`` or ``"cuda_ext"`` (that kernel on CUDA, C++ on the CPU; a kernel that cannot
    run is a :class:`autopar.KernelError`), or ``"torch"`` (no kernels).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        capturable: bool = False,
        backend: str = "auto",
    ) -> None:
        if backend not in BACKENDS:
            raise KernelError(f"AdamW: unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
        if not 0.0 <= lr or not 0.0 <= eps or not 0.0 <= weight_decay:
            raise AutoparError(f"AdamW: lr={lr}, eps={eps}, weight_decay={weight_decay} must be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise AutoparError(f"AdamW: betas={betas} must be in [0, 1)")
        # the keys and defaults of torch.optim.AdamW's param groups, so state_dicts interchange
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=None,
            capturable=capturable,
            differentiable=False,
            fused=None,
            decoupled_weight_decay=True,
        )
        _check_group(defaults)
        self.backend = backend
        self._cpu_adam_failed = False
        super().__init__(params, defaults)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "backend": self.backend}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("_cpu_adam_failed", False)

    def _kernel(self, tensors: tuple[torch.Tensor, ...]) -> str:
        """Which kernel updates one parameter, given its local (param, grad, exp_avg, exp_avg_sq)."""
        p = tensors[0]
        if self.backend == "torch" or not all(t.is_contiguous() for t in tensors):
            return "torch"
        if p.device.type == "cpu":
            return "cpu_adam" if p.dtype == torch.float32 and not self._cpu_adam_failed else "torch"
        if p.dtype not in _KERNEL_DTYPES:
            return "torch"
        return "cuda_ext" if self.backend == "cuda_ext" else "triton"

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _check_group(group)
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        batches: dict[tuple, list[tuple[torch.Tensor, ...]]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            if grad.is_sparse:
                raise AutoparError("autopar.optim.AdamW does not support sparse gradients")
            if isinstance(p, DTensor) and isinstance(grad, DTensor) and grad.placements != p.placements:
                grad = grad.redistribute(p.device_mesh, p.placements)
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            tensors = tuple(_local(t) for t in (p, grad, state["exp_avg"], state["exp_avg_sq"]))
            key = (self._kernel(tensors), tensors[0].device, tensors[0].dtype, int(state["step"].item()))
            batches[key].append(tensors)
        beta1, beta2 = (float(b) for b in group["betas"])
        hyper = dict(
            lr=float(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
        )
        for (kernel, _, _, step), tensors in batches.items():
            self._run(kernel, [list(ts) for ts in zip(*tensors)], step, hyper)

    def _run(self, kernel: str, lists: list[list[torch.Tensor]], step: int, hyper: dict[str, float]) -> None:
        """One kernel call on parallel lists (params, grads, exp_avgs, exp_avg_sqs)."""
        from autopar.runtime.kernels.adamw import adamw_step

        if kernel == "cpu_adam":
            from autopar.runtime.kernels.cpu_adam import cpu_adamw_step

            try:
                return cpu_adamw_step(*lists, step=step, **hyper)
            except KernelError as exc:
                if self.backend != "auto":
                    raise
                self._cpu_adam_failed = True
                warnings.warn(f"{exc}; AdamW steps the CPU parameters with torch ops instead", stacklevel=2)
                kernel = "torch"
        if kernel == "cuda_ext":
            from autopar.runtime.kernels.cuda_ext import cuda_adamw_step

            return cuda_adamw_step(*lists, step=step, **hyper)
        backend = "torch" if kernel == "torch" else self.backend
        adamw_step(*lists, step=step, backend=backend, **hyper)
