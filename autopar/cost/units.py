"""Byte sizes written by people: ``"60GiB"``, ``"512MB"``, ``80 * 2**30``."""

from __future__ import annotations

import re

from autopar.errors import AutoparError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_bytes(value: int | float | str | None) -> int | None:
    if value is None or isinstance(value, (int, float)):
        return None if value is None else int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise AutoparError(
            f"cannot read memory size {value!r}: write a number of bytes or a size like '60GiB', '512MB'"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
