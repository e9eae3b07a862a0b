"""Checkpoints: parameters saved to a portable .ckpt file (a NumPy .npz archive, no pickle)."""
from __future__ import annotations

import os
import tempfile

import numpy as np

from runtime.nn.cell import Cell


def save_checkpoint(save_obj, ckpt_file_name: str) -> str:
    """Save a Cell's parameters (or a list of Parameters, or a {name: array} dict) atomically."""
    if isinstance(save_obj, Cell):
        items = {p.name: p.data for p in save_obj.get_parameters()}
    elif isinstance(save_obj, dict):
        items = {k: np.asarray(getattr(v, "data", v)) for k, v in save_obj.items()}
    else:
        items = {p.name: p.data for p in save_obj}
    path = str(ckpt_file_name)
    if not path.endswith(".ckpt"):
        path += ".ckpt"
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **items)
    os.replace(tmp, path)
    return path


def load_checkpoint(ckpt_file_name: str, net=None) -> dict:
    """Read a checkpoint into {name: array}; with ``net`` also load it into the net."""
    try:
        with np.load(ckpt_file_name, allow_pickle=False) as z:
            params = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise FileNotFoundError(f"load_checkpoint: no checkpoint file at {ckpt_file_name}") from None
    except (ValueError, OSError) as e:
        raise ValueError(f"load_checkpoint: {ckpt_file_name} is not a readable checkpoint ({e})") from None
    if net is not None:
        load_param_into_net(net, params)
    return params


def load_param_into_net(net, parameter_dict: dict, strict: bool = True) -> list[str]:
    """Copy arrays into the net's parameters by name; returns names not found in the dict."""
    missing = []
    for p in net.get_parameters():
        if p.name not in parameter_dict:
            missing.append(p.name)
            continue
        p.set_data(parameter_dict[p.name])
    if strict and missing:
        raise KeyError(f"load_param_into_net: the checkpoint has no value for {missing}")
    return missing
