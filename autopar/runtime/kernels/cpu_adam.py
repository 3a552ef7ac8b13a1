"""AdamW on the CPU in C++: the optimizer step of parameters offloaded to host memory.

:func:`cpu_adamw_step` updates the parameters and both moments of many fp32 tensors in one
call, in place, with torch.optim.AdamW's arithmetic (``csrc/cpu_adam.cpp``: OpenMP threads
over chunks of all tensors, a SIMD loop in each). The extension is compiled on first use with
``torch.utils.cpp_extension.load`` (about 20 s) into torch's extensions directory
(``TORCH_EXTENSIONS_DIR``) and loaded from there afterwards. A build that fails (no compiler,
no ninja, a compiler error) is a :class:`autopar.KernelError` naming the kernel and what the
compiler said; ``backend="torch"`` of :class:`autopar.optim.AdamW` needs no build.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import torch

from autopar.errors import KernelError

SOURCE = Path(__file__).parent / "csrc" / "cpu_adam.cpp"
# -fno-math-errno: sqrt without its errno branch, else the element loop is not vectorized
_CFLAGS = ["-O3", "-fno-math-errno", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]


def _gist(message: str, max_lines: int = 4) -> str:
    """The lines of a build log that say what went wrong (else its last line)."""
    message = re.sub(r"^Error building extension '[^']*': ", "", message)
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    said = [ln for ln in lines if not ln.startswith(("[", "FAILED:", "ninja:"))]  # not ninja's echo
    hits = [ln for ln in said if re.search(r"\berror\b|fatal|not found|no such file|required", ln, re.I)]
    picked = list(dict.fromkeys(hits))[:max_lines] or (said or lines)[-1:]
    return " | ".join(ln[:240] for ln in picked)


def build_extension(kernel: str, name: str, sources: Sequence[Path], **load_kwargs: object) -> ModuleType:
    """``torch.utils.cpp_extension.load`` of ``sources`` as module ``name``; any failure is a
    :class:`KernelError` for ``kernel``."""
    from torch.utils import cpp_extension

    try:
        return cpp_extension.load(name=name, sources=[str(s) for s in sources], **load_kwargs)
    except Exception as exc:  # compiler missing or failing, ninja missing, bad flags: all mean "no kernel"
        raise KernelError(
            f"{kernel}: building the C++ extension {name!r} failed: {_gist(str(exc))}; "
            "the build needs a C++ compiler and ninja (pip install ninja); or pass backend='torch'"
        ) from exc


def load_once(build: Callable[[], ModuleType]) -> Callable[[], ModuleType]:
    """``build`` run on the first call only: later calls return its module, or raise its
    :class:`KernelError` again without another (slow) attempt."""

    @functools.cache
    def outcome() -> ModuleType | KernelError:
        try:
            return build()
        except KernelError as exc:
            return exc

    def loaded() -> ModuleType:
        result = outcome()
        if isinstance(result, KernelError):
            raise KernelError(str(result))
        return result

    return loaded


def _build() -> ModuleType:
    return build_extension(
        "cpu_adamw", "autopar_cpu_adam", [SOURCE], extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS
    )


#: the compiled extension, built on the first call in a process
module = load_once(_build)


def cpu_adamw_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step of all ``params`` (contiguous fp32 CPU tensors), in place; ``step`` is
    the step number after incrementing (1 on the first step), as in torch.optim.AdamW."""
    module().adamw_step(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
        int(step), float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
    )  # fmt: skip
