"""Model: ties a network, a loss and an optimizer into a training step and runs it.

GRAPH_MODE traces ONE graph per input signature -- forward, loss, backward (IR autodiff)
and the optimizer's in-place updates -- runs the pass pipeline over it and executes it.
PYNATIVE_MODE runs the same Cells eagerly, recording a tape for the backward.
"""
from __future__ import annotations

import time

import numpy as np
from tqdm.auto import tqdm

from runtime import context, core, hooks
from runtime.autodiff import grad, grad_eager
from runtime.core import GraphBuilder, Tensor, building
from runtime.executor import CompiledGraph
from runtime.ir.graph import Graph
from runtime.passes import pipeline
from runtime.train.callback import CallbackList, RunContext
from runtime.train.metrics import get_metric


def _batch_tuple(batch):
    if isinstance(batch, dict):
        batch = tuple(batch.values())
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError("Model: each dataset item must be a (data, label) tuple; got "
                         f"{type(batch).__name__}")
    return tuple(np.asarray(b) for b in batch[:2])


def _sig(arrays):
    return tuple((a.shape, a.dtype.str) for a in arrays)


class Model:
    def __init__(self, network, loss_fn=None, optimizer=None, metrics=None, progress: bool = True):
        self.network = network
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.metrics = {m if isinstance(m, str) else type(m).__name__: m for m in (metrics or [])}
        self.progress = progress
        self._train_graphs: dict = {}
        self._eval_graphs: dict = {}
        self.step = 0
        if optimizer is not None:
            network.trainable_params()  # names parameters by their path before tracing

    # -- graph construction ---------------------------------------------------------------------
    def build_train_graph(self, data: np.ndarray, label: np.ndarray) -> Graph:
        """Trace the whole training step for this input signature into one Graph (before passes)."""
        if self.loss_fn is None or self.optimizer is None:
            raise ValueError("Model.train needs both loss_fn and optimizer")
        g = Graph("train_step")
        b = GraphBuilder(g)
        self.network.set_train(True)
        with building(b):
            x = b.input("data", data.shape, data.dtype)
            y = b.input("label", label.shape, label.dtype)
            logits = self.network(x)
            loss = self.loss_fn(logits, y)
            if loss.size != 1:
                raise ValueError(f"Model: the loss must be a scalar but {self.loss_fn!r} returned shape "
                                 f"{loss.shape}; use reduction='mean'")
            params = self.optimizer.parameters
            grads = grad(loss, params, sparse=self.optimizer.sparse)
            self.optimizer(grads)
        g.outputs = {"loss": loss.node, "logits": logits.node}
        return g

    def build_eval_graph(self, data: np.ndarray, label: np.ndarray | None) -> Graph:
        g = Graph("eval_step")
        b = GraphBuilder(g)
        self.network.set_train(False)
        with building(b):
            x = b.input("data", data.shape, data.dtype)
            logits = self.network(x)
            g.outputs = {"logits": logits.node}
            if label is not None and self.loss_fn is not None:
                y = b.input("label", label.shape, label.dtype)
                g.outputs["loss"] = self.loss_fn(logits, y).node
        return g

    def _compiled(self, cache, build, *arrays):
        key = _sig([a for a in arrays if a is not None])
        exe = cache.get(key)
        if exe is None:
            t0 = time.perf_counter_ns()
            graph = pipeline(build(*arrays))
            exe = CompiledGraph(graph)
            cache[key] = exe
            if hooks.listening:
                hooks.emit("graph", {"name": graph.name, "nodes": len(graph.nodes), "start_ns": t0,
                                     "end_ns": time.perf_counter_ns(), "dump": graph.dump()})
        return exe

    def train_graph(self, data, label) -> CompiledGraph:
        return self._compiled(self._train_graphs, self.build_train_graph, data, label)

    # -- one step ---------------------------------------------------------------------------------
    def train_step(self, data: np.ndarray, label: np.ndarray) -> float:
        """Run one training step on a batch; returns the loss."""
        self.optimizer.step_begin(self.step)
        if context.get_context("mode") == context.GRAPH_MODE:
            out = self.train_graph(data, label)({"data": data, "label": label}, step=self.step)
            loss = out["loss"]
        else:
            self.network.set_train(True)
            tape = core.Tape()
            with core.recording(tape):
                logits = self.network(Tensor(data))
                loss_t = self.loss_fn(logits, Tensor(label))
            grads = grad_eager(tape, loss_t, self.optimizer.parameters, sparse=self.optimizer.sparse)
            self.optimizer(grads)
            loss = loss_t.asnumpy()
        self.step += 1
        return float(loss)

    # -- loops ------------------------------------------------------------------------------------------
    def train(self, epoch: int, train_dataset, callbacks=None, dataset_sink_mode: bool = False):
        if dataset_sink_mode:
            raise ValueError("Model.train: dataset_sink_mode=True needs the device data queue, which this "
                             "runtime does not provide yet; pass dataset_sink_mode=False")
        cbs = CallbackList(callbacks if isinstance(callbacks, (list, tuple)) else ([callbacks] if callbacks else []))
        try:
            batch_num = train_dataset.get_dataset_size()
        except (AttributeError, TypeError):
            batch_num = len(train_dataset)
        params = {"epoch_num": epoch, "batch_num": batch_num, "cur_epoch_num": 0, "cur_step_num": 0,
                  "train_network": self.network, "net_outputs": None, "optimizer": self.optimizer}
        ctx = RunContext(params)
        cbs.begin(ctx)
        bar = tqdm(total=batch_num * epoch, unit="step", disable=not self.progress, dynamic_ncols=True)
        for e in range(1, epoch + 1):
            params["cur_epoch_num"] = e
            bar.set_description(f"epoch {e}/{epoch}")
            cbs.epoch_begin(ctx)
            for batch in train_dataset:
                data, label = _batch_tuple(batch)
                params["cur_step_num"] += 1
                cbs.step_begin(ctx)
                if hooks.listening:
                    hooks.emit("step", {"phase": "begin", "step": self.step, "epoch": e,
                                        "t_ns": time.perf_counter_ns()})
                loss = self.train_step(data, label)
                if hooks.listening:
                    hooks.emit("step", {"phase": "end", "step": self.step - 1, "epoch": e,
                                        "t_ns": time.perf_counter_ns(), "loss": loss})
                params["net_outputs"] = np.float32(loss)
                bar.update(1)
                if params["cur_step_num"] % 10 == 0:
                    bar.set_postfix(loss=f"{loss:.4f}")
                cbs.step_end(ctx)
                if ctx.get_stop_requested():
                    break
            cbs.epoch_end(ctx)
            if ctx.get_stop_requested():
                break
        bar.close()
        cbs.end(ctx)
        return params

    def eval(self, valid_dataset) -> dict:
        metrics = {name: get_metric(m) for name, m in self.metrics.items()} or {"accuracy": get_metric("accuracy")}
        for m in metrics.values():
            m.clear()
        for batch in valid_dataset:
            data, label = _batch_tuple(batch)
            logits, loss = self._forward(data, label)
            for m in metrics.values():
                m.update(logits, label, loss)
        self.network.set_train(True)
        return {name: m.eval() for name, m in metrics.items()}

    def _forward(self, data, label=None):
        if context.get_context("mode") == context.GRAPH_MODE:
            exe = self._compiled(self._eval_graphs, self.build_eval_graph, data, label)
            feeds = {"data": data} if label is None else {"data": data, "label": label}
            out = exe(feeds)
            return out["logits"], out.get("loss")
        self.network.set_train(False)
        logits = self.network(Tensor(data))
        loss = self.loss_fn(logits, Tensor(label)).asnumpy() if (label is not None and self.loss_fn) else None
        return logits.asnumpy(), loss

    def predict(self, data) -> np.ndarray:
        data = np.asarray(data)
        return self._forward(data)[0]
