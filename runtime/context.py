"""Global execution context, MindSpore-style: ``context.set_context(mode=GRAPH_MODE, ...)``."""
from __future__ import annotations

import numpy as np

from runtime import random as _random
from runtime.units import parse_size

GRAPH_MODE = 0
PYNATIVE_MODE = 1

_DEVICE_TARGETS = ("Ascend", "CPU")

_state = {
    "mode": GRAPH_MODE,
    "device_target": "Ascend",
    "seed": 0,
    "enable_graph_kernel": False,
    "device_memory": None,
    "save_graphs": False,
    "compute_streams": 1,
}


def set_context(**kwargs) -> None:
    """Set one or more of: mode, device_target, seed, enable_graph_kernel, device_memory ("512MB"),
    save_graphs, compute_streams (1 or 2)."""
    for key, value in kwargs.items():
        if key not in _state:
            raise ValueError(f"set_context: unknown option {key!r}; known options are {sorted(_state)}")
        if key == "mode" and value not in (GRAPH_MODE, PYNATIVE_MODE):
            raise ValueError(f"set_context: mode must be GRAPH_MODE (0) or PYNATIVE_MODE (1), got {value!r}")
        if key == "device_target" and value not in _DEVICE_TARGETS:
            raise ValueError(f"set_context: device_target must be one of {_DEVICE_TARGETS}, got {value!r}")
        if key == "seed":
            value = int(value)
        if key == "compute_streams" and value not in (1, 2):
            raise ValueError(f"set_context: compute_streams must be 1 or 2, got {value!r}")
        if key == "device_memory" and value is not None:
            parse_size(value)  # fail here, with the option's name, on a bad size
        _state[key] = value
    if "seed" in kwargs:
        _random.set_seed(_state["seed"])


def get_context(key: str):
    if key not in _state:
        raise ValueError(f"get_context: unknown option {key!r}; known options are {sorted(_state)}")
    return _state[key]


def reset_context() -> None:
    set_context(mode=GRAPH_MODE, device_target="Ascend", seed=0, enable_graph_kernel=False,
                device_memory=None, save_graphs=False, compute_streams=1)
