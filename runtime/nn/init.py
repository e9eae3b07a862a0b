"""Parameter initializers (seeded): normal, uniform, xavier/glorot, he (kaiming), zeros, ones."""
from __future__ import annotations

import math

import numpy as np

from runtime import random as _random


def _fans(shape):
    if len(shape) < 2:
        return (shape[0] if shape else 1), (shape[0] if shape else 1)
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    # weights are stored (out, in, ...) as MindSpore does
    return shape[1] * receptive, shape[0] * receptive


def initializer(init, shape, dtype=np.float32, seed: int | None = None, key: str = "") -> np.ndarray:
    """Build an array for ``shape`` from ``init``: a name, a number, or an array."""
    shape = tuple(int(s) for s in shape)
    if isinstance(init, np.ndarray):
        if init.shape != shape:
            raise ValueError(f"initializer: array of shape {init.shape} given for a parameter of shape {shape}")
        return init.astype(dtype)
    if isinstance(init, (int, float)):
        return np.full(shape, init, dtype=dtype)
    rng = _random.generator(seed, key)
    fan_in, fan_out = _fans(shape)
    name = str(init).lower()
    if name == "zeros":
        out = np.zeros(shape)
    elif name == "ones":
        out = np.ones(shape)
    elif name == "normal":
        out = rng.normal(0.0, 0.01, shape)
    elif name == "uniform":
        out = rng.uniform(-0.07, 0.07, shape)
    elif name in ("xavier_uniform", "glorot_uniform"):
        lim = math.sqrt(6.0 / (fan_in + fan_out))
        out = rng.uniform(-lim, lim, shape)
    elif name in ("xavier_normal", "glorot_normal"):
        out = rng.normal(0.0, math.sqrt(2.0 / (fan_in + fan_out)), shape)
    elif name in ("he_normal", "kaiming_normal"):
        out = rng.normal(0.0, math.sqrt(2.0 / fan_in), shape)
    elif name in ("he_uniform", "kaiming_uniform"):
        lim = math.sqrt(6.0 / fan_in)
        out = rng.uniform(-lim, lim, shape)
    elif name == "default":  # PyTorch's Linear/Conv default: kaiming_uniform(a=sqrt(5))
        lim = 1.0 / math.sqrt(fan_in)
        out = rng.uniform(-lim, lim, shape)
    else:
        raise ValueError(f"initializer: unknown init {init!r}; use normal, uniform, xavier_uniform, "
                         f"xavier_normal, he_normal, he_uniform, zeros, ones, a number or an array")
    return out.astype(dtype)
