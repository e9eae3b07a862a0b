"""Training callbacks (MindSpore-shaped): step/epoch begin/end hooks with a RunContext."""
from __future__ import annotations

import os
import time

import numpy as np
from tqdm.auto import tqdm

from runtime.train.serialization import save_checkpoint


class RunContext:
    def __init__(self, cb_params: dict):
        self._params = cb_params
        self._stop = False

    def original_args(self) -> dict:
        return self._params

    def request_stop(self) -> None:
        self._stop = True

    def get_stop_requested(self) -> bool:
        return self._stop


class Callback:
    def begin(self, run_context): ...
    def epoch_begin(self, run_context): ...
    def epoch_end(self, run_context): ...
    def step_begin(self, run_context): ...
    def step_end(self, run_context): ...
    def end(self, run_context): ...


class CallbackList(Callback):
    def __init__(self, callbacks):
        self.callbacks = list(callbacks or [])

    def _each(name):
        def fn(self, ctx):
            for cb in self.callbacks:
                getattr(cb, name)(ctx)
        return fn

    begin = _each("begin")
    epoch_begin = _each("epoch_begin")
    epoch_end = _each("epoch_end")
    step_begin = _each("step_begin")
    step_end = _each("step_end")
    end = _each("end")


class LossMonitor(Callback):
    """Prints the loss every ``per_print_times`` steps; stops training on a NaN/Inf loss."""

    def __init__(self, per_print_times: int = 1):
        if per_print_times < 1:
            raise ValueError(f"LossMonitor: per_print_times must be >= 1, got {per_print_times}")
        self.per_print_times = per_print_times
        self.losses: list[float] = []

    def step_end(self, run_context):
        p = run_context.original_args()
        loss = float(np.asarray(p["net_outputs"]))
        self.losses.append(loss)
        step_in_epoch = (p["cur_step_num"] - 1) % p["batch_num"] + 1
        if not np.isfinite(loss):
            run_context.request_stop()
            raise ValueError(f"epoch {p['cur_epoch_num']} step {step_in_epoch}: loss is {loss}; training stopped")
        if p["cur_step_num"] % self.per_print_times == 0:
            tqdm.write(f"epoch: {p['cur_epoch_num']} step: {step_in_epoch}, loss is {loss:.6f}")


class TimeMonitor(Callback):
    """Reports epoch time and average step time."""

    def __init__(self, data_size: int | None = None):
        self.data_size = data_size
        self.epoch_times: list[float] = []

    def epoch_begin(self, run_context):
        self._t0 = time.perf_counter()

    def epoch_end(self, run_context):
        dt = time.perf_counter() - self._t0
        self.epoch_times.append(dt)
        steps = self.data_size or run_context.original_args()["batch_num"]
        tqdm.write(f"epoch time: {dt * 1000:.1f} ms, per step time: {dt * 1000 / max(steps, 1):.3f} ms")


class CheckpointConfig:
    def __init__(self, save_checkpoint_steps: int = 1, keep_checkpoint_max: int = 5):
        self.save_checkpoint_steps = int(save_checkpoint_steps)
        self.keep_checkpoint_max = int(keep_checkpoint_max)


class ModelCheckpoint(Callback):
    """Saves the network's parameters to ``directory/prefix-EPOCH_STEP.ckpt`` every N steps."""

    def __init__(self, prefix: str = "CKP", directory: str | None = None, config: CheckpointConfig | None = None):
        self.prefix = prefix
        self.directory = directory or os.getcwd()
        self.config = config or CheckpointConfig()
        self.saved: list[str] = []

    def step_end(self, run_context):
        p = run_context.original_args()
        if p["cur_step_num"] % self.config.save_checkpoint_steps:
            return
        step_in_epoch = (p["cur_step_num"] - 1) % p["batch_num"] + 1
        path = os.path.join(self.directory, f"{self.prefix}-{p['cur_epoch_num']}_{step_in_epoch}.ckpt")
        self.saved.append(save_checkpoint(p["train_network"], path))
        while len(self.saved) > self.config.keep_checkpoint_max:
            old = self.saved.pop(0)
            if os.path.exists(old):
                os.remove(old)
