"""Run a check function on 4 CPU processes over gloo, once per test module.

The check runs on every rank (collectives need all of them) and returns a JSON-able dict;
rank 0's dict comes back to the test. A failure on any rank fails the test with its traceback.

The ranks run fused kernels with their torch implementation unless ``triton=True``: the
Triton interpreter is slow, and only ``test_fused.py`` is about the Triton kernels.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from autopar.runtime.local_mesh import run_gloo


def _run_and_save(rank: int, check: Callable[[], dict], path: str) -> None:
    result = check()
    if rank == 0:
        Path(path).write_text(json.dumps(result))


def run_on_mesh(check: Callable[[], dict], world: int = 4, triton: bool = False) -> dict:
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if triton else "0"  # the spawned ranks read it at import
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/result.json"
            try:
                run_gloo(_run_and_save, (check, path), world)
            except RuntimeError as exc:
                raise AssertionError(f"distributed check failed: {exc}") from None
            return json.loads(Path(path).read_text())
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before
