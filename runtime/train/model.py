"""Model: ties a network, a loss and an optimizer into a training step and runs it.

GRAPH_MODE traces ONE graph per input signature -- forward, loss, backward (IR autodiff)
and the optimizer's in-place updates -- runs the pass pipeline over it and executes it.
PYNATIVE_MODE runs the same Cells eagerly, recording a tape for the backward.
"""
from __future__ import annotations

import time

import numpy as np
from tqdm.auto import tqdm

from runtime import communication, context, core, hooks, host_memory
from runtime.autodiff import apply_update_eager, grad, grad_eager
from runtime.core import GraphBuilder, Tensor, building
from runtime.device.queue import SinkFeeder
from runtime.compiler import compile as compile_graph
from runtime.executor import CompiledGraph
from runtime.ir.graph import Graph
from runtime.nn.embedding import flush_host_tables
from runtime.nn.optim import OptimizerGroup
from runtime.ops.comm import gather_sparse_gradients, reduce_gradients_eager
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
        # several optimizers (each with its own target), e.g. FTRL + LazyAdam for Wide&Deep
        self.optimizer = OptimizerGroup(optimizer) if isinstance(optimizer, (list, tuple)) else optimizer
        self.metrics = {m if isinstance(m, str) else type(m).__name__: m for m in (metrics or [])}
        self.progress = progress
        self._train_graphs: dict = {}
        self._eval_graphs: dict = {}
        self.step = 0
        self._params_broadcast = False
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
            with core.annotate(phase="forward"):
                logits = self.network(x)
                loss = self.loss_fn(logits, y)
            if loss.size != 1:
                raise ValueError(f"Model: the loss must be a scalar but {self.loss_fn!r} returned shape "
                                 f"{loss.shape}; use reduction='mean'")
            params = self.optimizer.parameters
            with core.annotate(phase="backward"):
                grads = grad(loss, params, sparse=self.optimizer.sparse)
            if communication.data_parallel():  # sparse rows are gathered before the optimizer sizes its update
                with core.annotate(phase="update"), core.scope_override("AllReduce"):
                    grads = gather_sparse_gradients(grads, [p.name for p in params])
            g.meta["gradients"] = list(zip(params, grads))  # for the data-parallel AllReduce pass
            target = {"primitive_target": self.optimizer.target} if self.optimizer.target else {}
            with core.annotate(phase="update", **target):
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
            exe = compile_graph(build(*arrays))
            graph = exe.graph
            cache[key] = exe
            if hooks.listening:
                hooks.emit("graph", {"name": graph.name, "nodes": len(graph.nodes), "start_ns": t0,
                                     "end_ns": time.perf_counter_ns(), "dump": graph.dump()})
        return exe

    def train_graph(self, data, label) -> CompiledGraph:
        return self._compiled(self._train_graphs, self.build_train_graph, data, label)

    # -- one step ---------------------------------------------------------------------------------
    def train_step(self, data: np.ndarray, label: np.ndarray, get_next: tuple | None = None) -> float:
        """Run one training step on a batch; returns the loss. ``get_next=(t0, t1)`` says the batch came
        from the device queue (data sink mode) and is already on the device."""
        with host_memory.step_memory():     # the step's arrays reuse cached memory (runtime/host_memory.py)
            return self._train_step(data, label, get_next)

    def _train_step(self, data: np.ndarray, label: np.ndarray, get_next: tuple | None) -> float:
        self.optimizer.step_begin(self.step)
        self.last_markers = None
        if communication.data_parallel() and not self._params_broadcast:  # every rank starts from rank 0's values
            communication.broadcast_parameters(self.network.get_parameters() + self.optimizer.state_parameters())
            self._params_broadcast = True
        if context.get_context("mode") == context.GRAPH_MODE:
            exe = self.train_graph(data, label)
            out = exe({"data": data, "label": label}, step=self.step, get_next=get_next)
            self.last_markers = exe.last_markers
            loss = out["loss"]
        else:
            self.network.set_train(True)
            tape = core.Tape()
            with core.recording(tape):
                logits = self.network(Tensor(data))
                loss_t = self.loss_fn(logits, Tensor(label))
            grads = grad_eager(tape, loss_t, self.optimizer.parameters, sparse=self.optimizer.sparse)
            if communication.data_parallel():
                grads = reduce_gradients_eager(grads)
            apply_update_eager(self.optimizer, grads)  # traced once per gradient signature, then replayed
            loss = loss_t.asnumpy()
            if communication.data_parallel():  # the global batch's loss, as the graph's AllReduce gives it
                loss = communication.all_reduce(np.asarray(loss), "mean")
        self.step += 1
        return float(loss)

    # -- loops ------------------------------------------------------------------------------------------
    def _batches(self, train_dataset, epoch: int, sink: bool, queue_size: int):
        """Yields (epoch, data, label, get_next) for every step; in sink mode through the device queue."""
        if not sink:
            for e in range(1, epoch + 1):
                for batch in train_dataset:
                    yield e, *_batch_tuple(batch), None
                yield e, None, None, None  # end of epoch
            return
        feeder = SinkFeeder(train_dataset, epoch, queue_size, _batch_tuple)
        self.sink_queue = feeder.queue
        try:
            per_epoch = self._batch_num
            for e in range(1, epoch + 1):
                for _ in range(per_epoch):
                    feeder.queue.step = self.step
                    try:
                        (data, label), t0, t1 = feeder.queue.pop()
                    except StopIteration:
                        break
                    yield e, data, label, (t0, t1)
                yield e, None, None, None
        finally:
            feeder.close()

    def train(self, epoch: int, train_dataset, callbacks=None, dataset_sink_mode: bool = False,
              sink_queue_size: int = 8):
        """Train for ``epoch`` passes over ``train_dataset``. With ``dataset_sink_mode=True`` (GRAPH_MODE)
        a host thread feeds batches through a bounded host->device queue and each step starts with a
        GetNext task that dequeues one."""
        if dataset_sink_mode and context.get_context("mode") != context.GRAPH_MODE:
            raise ValueError("Model.train: dataset_sink_mode=True needs GRAPH_MODE; set "
                             "context.set_context(mode=context.GRAPH_MODE) or pass dataset_sink_mode=False")
        cbs = CallbackList(callbacks if isinstance(callbacks, (list, tuple)) else ([callbacks] if callbacks else []))
        try:
            batch_num = train_dataset.get_dataset_size()
        except (AttributeError, TypeError):
            batch_num = len(train_dataset)
        self._batch_num = batch_num
        params = {"epoch_num": epoch, "batch_num": batch_num, "cur_epoch_num": 0, "cur_step_num": 0,
                  "train_network": self.network, "net_outputs": None, "optimizer": self.optimizer,
                  "dataset_sink_mode": bool(dataset_sink_mode)}
        ctx = RunContext(params)
        cbs.begin(ctx)
        bar = tqdm(total=batch_num * epoch, unit="step", disable=not self.progress, dynamic_ncols=True)
        batches = self._batches(train_dataset, epoch, dataset_sink_mode, sink_queue_size)
        cur_epoch = 0
        try:
            t_begin = time.perf_counter_ns()
            for e, data, label, get_next in batches:
                if e != cur_epoch:  # the first item of a new epoch
                    cur_epoch = params["cur_epoch_num"] = e
                    bar.set_description(f"epoch {e}/{epoch}")
                    cbs.epoch_begin(ctx)
                if data is None:  # the end of an epoch
                    cbs.epoch_end(ctx)
                    if ctx.get_stop_requested():
                        break
                    t_begin = time.perf_counter_ns()
                    continue
                params["cur_step_num"] += 1
                cbs.step_begin(ctx)
                if hooks.listening:
                    hooks.emit("step", {"phase": "begin", "step": self.step, "epoch": e, "t_ns": t_begin})
                loss = self.train_step(data, label, get_next)
                if hooks.listening:
                    ev = {"phase": "end", "step": self.step - 1, "epoch": e, "t_ns": time.perf_counter_ns(),
                          "loss": loss, "sink": get_next is not None}
                    ev.update(self.last_markers or {})
                    hooks.emit("step", ev)
                params["net_outputs"] = np.float32(loss)
                bar.update(1)
                if params["cur_step_num"] % 10 == 0:
                    bar.set_postfix(loss=f"{loss:.4f}")
                cbs.step_end(ctx)
                if ctx.get_stop_requested():
                    cbs.epoch_end(ctx)
                    break
                t_begin = time.perf_counter_ns()
        finally:
            batches.close()
            bar.close()
            flush_host_tables()  # deferred host-table updates (EmbeddingLookup overlap) are final
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
        with host_memory.step_memory():
            return self._forward_step(data, label)

    def _forward_step(self, data, label):
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
