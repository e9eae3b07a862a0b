"""Byte sizes: parsing '512MB' and printing 1.5 MB. Depends on nothing else in the runtime,
so ``context`` and ``device`` can both use it."""
from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "KB": 1 << 10, "K": 1 << 10, "MB": 1 << 20, "M": 1 << 20, "GB": 1 << 30, "G": 1 << 30}


def parse_size(value) -> int:
    """'512MB' / '2GB' / 1048576 -> bytes."""
    if isinstance(value, (int, float)):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]?B?)\s*", str(value).upper())
        if not m:
            raise ValueError(f"device_memory: cannot read {value!r}; write e.g. '512MB' or '2GB'")
        n = int(float(m.group(1)) * _UNITS[m.group(2)])
    if n <= 0:
        raise ValueError(f"device_memory must be positive, got {value!r}")
    return n


def fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
