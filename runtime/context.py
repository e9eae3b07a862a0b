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


# -- data parallelism (MindSpore's set_auto_parallel_context) -----------------------------------------
STAND_ALONE = "stand_alone"
DATA_PARALLEL = "data_parallel"
_parallel = {"parallel_mode": STAND_ALONE, "gradients_mean": False, "all_reduce_fusion_config": []}


def set_auto_parallel_context(**kwargs) -> None:
    """Set one or more of: parallel_mode ("stand_alone" or "data_parallel"), gradients_mean (average the
    AllReduced gradients over the group instead of summing them), all_reduce_fusion_config (split indices
    into the parameter list: ``[2, 6]`` puts gradients 0-1, 2-5 and 6-end into three AllReduce buckets;
    ``[]`` gives one AllReduce per gradient)."""
    for key, value in kwargs.items():
        if key not in _parallel:
            raise ValueError(f"set_auto_parallel_context: unknown option {key!r}; known options are {sorted(_parallel)}")
        if key == "parallel_mode" and value not in (STAND_ALONE, DATA_PARALLEL):
            raise ValueError(f"set_auto_parallel_context: parallel_mode must be {STAND_ALONE!r} or {DATA_PARALLEL!r}, "
                             f"got {value!r}")
        if key == "gradients_mean":
            value = bool(value)
        if key == "all_reduce_fusion_config":
            v = list(value or [])
            if not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in v) or v != sorted(set(v)):
                raise ValueError("set_auto_parallel_context: all_reduce_fusion_config must be strictly increasing "
                                 f"positive parameter indices (split points), got {value!r}")
            value = v
        _parallel[key] = value


def get_auto_parallel_context(key: str):
    if key not in _parallel:
        raise ValueError(f"get_auto_parallel_context: unknown option {key!r}; known options are {sorted(_parallel)}")
    return _parallel[key]


def reset_auto_parallel_context() -> None:
    set_auto_parallel_context(parallel_mode=STAND_ALONE, gradients_mean=False, all_reduce_fusion_config=[])
