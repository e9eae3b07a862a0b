"""Graph-kernel fusion (runtime/passes/graph_kernel): same training losses with fusion on and off, property
tests on random elementwise / broadcast / reduce graphs (values and gradients), cycle safety, kernel-launch
counts, the compiled-C vs interpreter equivalence and the no-compiler fallback, the on-disk kernel cache."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime import Model, Parameter, context, core, nn
from runtime.autodiff import grad
from runtime.core import GraphBuilder, building
from runtime.executor import CompiledGraph
from runtime.ir.graph import Graph
from runtime.models import MLP, LeNetDigits
from runtime.nn.transformer import BertSmall, MultiHeadAttention, bert_batch
from runtime.ops import api as F
from runtime.passes import assign_streams, order_effects, place
from runtime.passes.dce import dce
from runtime import codegen as kernels
from runtime.codegen import OPCODES, interpreter
from runtime.passes.graph_kernel import dumps, expand, fuse, graph_kernel, simplify

F32 = np.float32


# ---------------------------------------------------------------------------------------------------------
# the switch
# ---------------------------------------------------------------------------------------------------------
def test_enable_graph_kernel_switches_fusion_on_in_the_pipeline():
    from runtime import passes

    def probe():
        g = Graph("probe")
        b = GraphBuilder(g)
        with building(b):
            x = b.input("x", (8, 8), F32)
            g.outputs = {"y": F.tanh(F.add(x, 1.0)).node}
        return g

    def computed(g):
        return [n for n in g.nodes if n.op not in ("input", "const")]

    assert [n.op for n in computed(passes.pipeline(probe()))] == ["add", "tanh"]
    context.set_context(enable_graph_kernel=True)
    try:
        g = passes.pipeline(probe())
        (node,) = computed(g)
        assert node.op == "fused" and node.ann["fused_ops"] == ["add", "tanh"] and g.outputs["y"] is node
    finally:
        context.set_context(enable_graph_kernel=False)


def run_graph(graph: Graph, feeds: dict, fuse_it: bool) -> dict:
    g = dce(graph)
    if fuse_it:
        g = graph_kernel(g)
    g = assign_streams(place(order_effects(g)))
    return CompiledGraph(g)(feeds)


def train_losses(make, batches, fuse_it: bool, steps: int):
    context.set_context(seed=0, enable_graph_kernel=fuse_it)
    net, loss, opt = make()
    model = Model(net, loss, opt, progress=False)
    losses = [model.train_step(*batches[k % len(batches)]) for k in range(steps)]
    exe = model.train_graph(*batches[0])
    context.set_context(enable_graph_kernel=False)
    return np.array(losses), exe, net


# ---------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------
class EmbedBag(nn.Cell):
    """An embedding model: mean of token embeddings -> Dense -> tanh -> Dense."""

    def __init__(self, vocab=40, dim=16, classes=4):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim, embedding_table="normal")
        self.hidden = nn.Dense(dim, 32, activation="tanh")
        self.out = nn.Dense(32, classes)

    def construct(self, ids):
        return self.out(self.hidden(F.reduce_mean(self.embedding(ids), 1)))


class AttentionBlock(nn.Cell):
    """q.kT (batch_matmul) -> softmax -> .v, residual, LayerNorm, mean over tokens, classifier.

    With one head q, k, v are Dense layers applied to the (batch, seq, hidden) input directly (Dense reshapes
    to rows and back), so in the backward the batch_matmul gradients are reshaped to rows and read both by
    the weight-gradient GEMM (outside any fused group) and by the bias-gradient reduction (inside one): the
    graph that made fusion drop a GEMM still read by a view. With several heads it is MultiHeadAttention.
    """

    def __init__(self, hidden=16, heads=1, classes=3):
        super().__init__()
        self.heads = heads
        if heads == 1:
            self.q, self.k, self.v = nn.Dense(hidden, hidden), nn.Dense(hidden, hidden), nn.Dense(hidden, hidden)
        else:
            self.attention = MultiHeadAttention(hidden, heads)
        self.norm = nn.LayerNorm((hidden,))
        self.out = nn.Dense(hidden, classes)
        self.scale = 1.0 / np.sqrt(hidden)

    def construct(self, x):
        if self.heads == 1:
            q, k, v = self.q(x), self.k(x), self.v(x)
            p = F.softmax(F.mul(F.batch_matmul(q, k, transpose_b=True), self.scale), -1)
            a = F.batch_matmul(p, v)
        else:
            a = self.attention(x)
        y = self.norm(F.add(x, a))
        return self.out(F.reduce_mean(y, 1))


def _attention(heads):
    def data(_):
        rng = np.random.default_rng(11)
        batches = [(rng.normal(size=(4, 8, 16)).astype(F32), rng.integers(0, 3, 4).astype(np.int64))
                   for _ in range(3)]

        def make():
            net = AttentionBlock(16, heads)
            return net, _xent(), nn.Adam(net.trainable_params(), 3e-3)
        return make, batches
    return data


def _xent():
    return nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")


def _lenet(digits):
    xtr, ytr, _, _ = digits
    batches = [(xtr[i:i + 32].reshape(-1, 1, 8, 8).astype(F32), ytr[i:i + 32]) for i in range(0, 128, 32)]

    def make():
        net = LeNetDigits()
        return net, _xent(), nn.Momentum(net.trainable_params(), 0.05, 0.9)
    return make, batches


def _mlp(digits):
    xtr, ytr, _, _ = digits
    batches = [(xtr[i:i + 32].reshape(-1, 64).astype(F32), ytr[i:i + 32]) for i in range(0, 128, 32)]

    def make():
        net = MLP((64, 64, 64, 10), dropout=0.2)
        return net, _xent(), nn.Adam(net.trainable_params(), 2e-3, weight_decay=1e-4)
    return make, batches


def _embed(_):
    rng = np.random.default_rng(3)
    batches = []
    for _k in range(4):
        ids = rng.integers(0, 40, size=(16, 6)).astype(np.int64)
        batches.append((ids, (ids[:, 0] % 4).astype(np.int64)))

    def make():
        net = EmbedBag()
        return net, _xent(), nn.LazyAdam(net.trainable_params(), 5e-3)
    return make, batches


def _bert(_):
    batches = [bert_batch(4, 16, vocab=60, seed=s) for s in range(2)]

    def make():
        net = BertSmall(vocab_size=60, hidden_size=32, num_layers=2, num_heads=4, max_position=16)
        return net, _xent(), nn.AdamWeightDecay(net.trainable_params(), 1e-3, weight_decay=0.01)
    return make, batches


MODELS = {"lenet": _lenet, "mlp_dropout": _mlp, "embedding": _embed, "bert": _bert,
          "attention": _attention(1), "attention_mha": _attention(4)}


COMPOSITES = {"gelu", "gelu_grad", "layer_norm", "layer_norm_grad", "layer_norm_grad_params", "softmax",
              "softmax_grad", "log_softmax", "log_softmax_grad", "softmax_cross_entropy", "softmax_cross_entropy_grad",
              "reduce_mean", "relu_grad", "dropout_mask"}


def assert_fused_structure(fused: Graph, plain: Graph):
    """What fusion must produce from a training step: no composite left (all expanded into kernels), every
    optimizer assign computed in place by a kernel, each multi-output kernel unpacked once per output, and
    far fewer launches than the unfused step."""
    ops = [n.op for n in fused.nodes]
    assert not COMPOSITES & set(ops), COMPOSITES & set(ops)
    assert not any(n.op in ("fused", "fused_assign", "fused_get") for n in plain.nodes)
    assert "assign" not in ops and ops.count("fused_assign") == [n.op for n in plain.nodes].count("assign")
    written = [n.inputs[0].id for n in fused.nodes if n.op == "fused_assign"]
    assert len(written) == len(set(written))                      # one in-place kernel per variable
    for n in fused.nodes:
        if n.op == "fused":
            gets = sorted(g.attrs["index"] for g in fused.nodes if g.op == "fused_get" and g.inputs[0] is n)
            outs = len(n.attrs["_subgraph"].outputs)
            assert gets == (list(range(outs)) if outs > 1 else []), (n.name, gets, outs)
            assert n.ann["fused_ops"] and n.name.startswith("Fused_")
    launches = sum(op not in ("param", "const", "input", "fused_get") for op in ops)
    assert launches < 0.75 * sum(n.op not in ("param", "const", "input") for n in plain.nodes)


@pytest.mark.parametrize("model", list(MODELS))
def test_models_train_to_the_same_losses(model, digits):
    make, batches = MODELS[model](digits)
    off, exe_off, net_off = train_losses(make, batches, False, 20)
    on, exe_on, net_on = train_losses(make, batches, True, 20)
    assert_fused_structure(exe_on.graph, exe_off.graph)
    if model.startswith("attention"):   # q kT -> scale -> softmax -> p v and its backward: one tiled kernel each
        ops = {n.op: n.ann["fused_ops"] for n in exe_on.graph.nodes if n.op.startswith("fused_attention")}
        assert ops["fused_attention_fwd"] == ["batch_matmul", "mul", "softmax", "batch_matmul"]
        assert {"softmax_grad", "batch_matmul"} <= set(ops["fused_attention_grad"])
    np.testing.assert_allclose(on, off, rtol=1e-5, atol=1e-5)
    assert on[-1] < on[0]
    for p_on, p_off in zip(net_on.get_parameters(), net_off.get_parameters()):
        if p_on.name.endswith(("key.bias", "k.bias")):
            # the attention key bias: its gradient is exactly 0 in exact arithmetic (softmax shift invariance),
            # so Adam moves it by rounding noise
            continue
        np.testing.assert_allclose(p_on.data, p_off.data, rtol=1e-4, atol=1e-5, err_msg=p_on.name)


def test_bert_step_launches_far_fewer_kernels():
    make, batches = _bert(None)
    _, exe_off, _ = train_losses(make, batches, False, 1)
    _, exe_on, _ = train_losses(make, batches, True, 1)
    k_off = sum(t.kind == "kernel" for t in exe_off.tl.tasks)
    k_on = sum(t.kind == "kernel" for t in exe_on.tl.tasks)
    real_on = sum(t.kind == "kernel" and t.node.op != "fused_get" for t in exe_on.tl.tasks)
    assert k_on < 0.45 * k_off, (k_off, k_on)
    assert real_on < 0.35 * k_off, (k_off, real_on)
    # the profiler sees what each fused task contains
    table = exe_on.task_table()
    fused_rows = [f for f, op in zip(table["fused_ops"], table["op"]) if op in ("fused", "fused_assign")]
    assert fused_rows and all(fused_rows)
    assert any("reduce_max" in f and "exp" in f for f in fused_rows)        # a softmax in one kernel
    names = [t.name for t in exe_on.tl.tasks if t.node is not None and t.node.op == "fused"]
    assert all(n.startswith("Fused_") for n in names)
    # GEMMs feeding only one kernel run as its prologue (bias add, gelu, softmax, ... as epilogues)
    gemm = [t.node for t in exe_on.tl.tasks if t.node is not None and t.node.attrs.get("_prologue")]
    assert gemm and any(n.ann["fused_ops"][:3] == ["matmul", "add", "mul"] for n in gemm)


# ---------------------------------------------------------------------------------------------------------
# compiled C vs interpreter, and the fallback when no compiler works
# ---------------------------------------------------------------------------------------------------------
def _bert_params_after(backend_name, steps=3):
    make, batches = _bert(None)
    with kernels.backend(backend_name):
        losses, exe, net = train_losses(make, batches, True, steps)
    return losses, [p.data.copy() for p in net.get_parameters()], exe


def test_interpreter_is_bit_identical_to_compiled_kernels():
    if not kernels.compiler_available():
        pytest.skip("no C compiler")
    l_c, p_c, exe = _bert_params_after("c")
    assert any(n.op == "fused" for n in exe.graph.nodes)
    l_i, p_i, _ = _bert_params_after("interp")
    np.testing.assert_array_equal(l_c, l_i)
    for a, b in zip(p_c, p_i):
        np.testing.assert_array_equal(a, b)


def test_no_compiler_falls_back_to_the_interpreter():
    l_ref, p_ref, _ = _bert_params_after("interp")
    with kernels.compiler("/nonexistent/bin/gcc"), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        l_fb, p_fb, exe = _bert_params_after("auto")
        assert not kernels.compiler_available()
    assert any("interpreter" in str(x.message) for x in w)
    np.testing.assert_array_equal(l_fb, l_ref)
    for a, b in zip(p_fb, p_ref):
        np.testing.assert_array_equal(a, b)


def test_numpy_backend_runs_fused_groups_op_by_op(rng):
    """The last resort (no Cython helper): the fused primitive evaluates its group with the primitives' kernels."""
    g = Graph("np_backend")
    b = GraphBuilder(g)
    with building(b):
        x = b.input("x", (6, 40), F32)
        g.outputs = {"y": F.layer_norm(F.softmax(F.mul(x, 3.0), -1), np.ones(40, F32), np.zeros(40, F32), 1e-5).node}
    feeds = {"x": rng.normal(size=(6, 40)).astype(F32)}
    with kernels.backend("numpy"):
        fused = graph_kernel(dce(g))
        (node,) = [n for n in fused.nodes if n.op == "fused"]
        assert node.attrs["_program"].backend() == "numpy"
        with pytest.raises(RuntimeError, match="op by op"):
            node.attrs["_program"](feeds["x"])
        got = run_graph(g, feeds, True)["y"]
    np.testing.assert_allclose(got, run_graph(g, feeds, False)["y"], rtol=1e-5, atol=1e-5)


def test_output_buffer_pool_never_hands_out_live_memory():
    pool = kernels.BufferPool(limit=64 << 20)
    a = pool.empty((512, 512), F32, 1 << 20)
    a[:] = 1.0
    view = a[3:]                                   # a view keeps the buffer alive
    del a
    b = pool.empty((512, 512), F32, 1 << 20)
    assert not np.shares_memory(b, view) and b.ctypes.data % 64 == 0
    del view
    c = pool.empty((1 << 18,), F32, 1 << 20)        # free again: recycled
    assert pool.bytes == 2 << 20 and c.size == 1 << 18


def test_opcode_tables_agree():
    assert interpreter.opcodes() == OPCODES


# ---------------------------------------------------------------------------------------------------------
# every expansion is numerically faithful (fused graph vs the composite primitive's kernel)
# ---------------------------------------------------------------------------------------------------------
def _one_op_graph(fn, shapes, int_inputs=()):
    g = Graph("one")
    b = GraphBuilder(g)
    with building(b):
        xs = [b.input(f"x{k}", s, np.int64 if k in int_inputs else F32) for k, s in enumerate(shapes)]
        g.outputs = {"y": fn(*xs).node}
    return g


EXPANSIONS = [
    ("gelu", lambda x: F.gelu(x), [(6, 50)], 1e-6),
    ("gelu_grad", lambda x, g: F.gelu_grad(x, g), [(6, 50), (6, 50)], 1e-6),
    ("layer_norm", lambda x, g, b: F.layer_norm(x, g, b, 1e-5), [(4, 5, 48), (48,), (48,)], 1e-5),
    ("layer_norm_grad", lambda x, g, d: F.layer_norm_grad(x, g, d, 1e-5), [(7, 48), (48,), (7, 48)], 1e-5),
    ("layer_norm_grad_params", lambda x, d: F.layer_norm_grad_params(x, d, 1e-5), [(3, 7, 48), (3, 7, 48)], 1e-5),
    ("softmax_last", lambda x: F.softmax(x, -1), [(5, 3, 40)], 1e-6),
    ("softmax_axis0", lambda x: F.softmax(x, 0), [(40, 3)], 1e-6),
    ("softmax_grad", lambda y, g: F.softmax_grad(y, g, -1), [(5, 40), (5, 40)], 1e-6),
    ("log_softmax", lambda x: F.log_softmax(x, 1), [(5, 40, 2)], 1e-6),
    ("log_softmax_grad", lambda y, g: F.log_softmax_grad(y, g, -1), [(5, 40), (5, 40)], 1e-6),
    ("xent_dense", lambda x, t: F.softmax_cross_entropy(x, t, False), [(9, 11), (9, 11)], 1e-6),
    ("xent_dense_grad", lambda x, t, g: F.softmax_cross_entropy_grad(x, t, g, False), [(9, 11), (9, 11), (9,)], 1e-6),
    ("reduce_mean", lambda x: F.reduce_mean(x, (0, 2), True), [(6, 5, 70)], 1e-6),
    ("relu_grad", lambda x, g: F.relu_grad(x, g), [(33, 20), (33, 20)], 0),
]


@pytest.mark.parametrize("name,fn,shapes,tol", EXPANSIONS, ids=[e[0] for e in EXPANSIONS])
def test_expansion_is_faithful(name, fn, shapes, tol, rng):
    g = _one_op_graph(fn, shapes)
    feeds = {f"x{k}": rng.normal(size=s).astype(F32) for k, s in enumerate(shapes)}
    if name.startswith("xent_dense"):
        feeds["x1"] = np.abs(feeds["x1"]) / np.abs(feeds["x1"]).sum(1, keepdims=True)
    with kernels.backend("interp"):
        fused = graph_kernel(dce(g))
        # one kernel computes the composite; the (2, D) stack of the two parameter gradients is a concat of two
        # reductions that are not producer and consumer (no sibling fusion)
        want_ops = ["fused", "fused", "concat"] if name == "layer_norm_grad_params" else ["fused"]
        assert [n.op for n in fused.nodes if n.op not in ("input", "param", "const")] == want_ops, fused.dump()
        assert all(not COMPOSITES & set(n.ann["fused_ops"]) for n in fused.nodes if n.op == "fused")
        want = run_graph(g, feeds, False)["y"]
        got = run_graph(g, feeds, True)["y"]
    np.testing.assert_allclose(got, want, rtol=max(tol, 1e-7), atol=max(tol, 1e-7) * 10)


def test_sparse_xent_and_dropout_expansions(rng):
    g = Graph("xent")
    b = GraphBuilder(g)
    with building(b):
        x = b.input("x", (8, 10), F32)
        y = b.input("y", (8,), np.int64)
        w = Parameter(rng.normal(size=(8, 10)).astype(F32), name="w")
        h = F.dropout(F.mul(x, w), 0.7, np.random.default_rng(5))
        loss = F.reduce_mean(F.softmax_cross_entropy(h, y, True))
        (gw,) = grad(loss, [w])
        g.outputs = {"loss": loss.node, "gw": gw.node}
    feeds = {"x": rng.normal(size=(8, 10)).astype(F32), "y": rng.integers(0, 10, 8)}
    want = run_graph(g, feeds, False)
    # the same generator state again: dropout draws the same masks
    for n in g.nodes:
        if "_rng" in n.attrs:
            n.attrs["_rng"] = np.random.default_rng(5)
    got = run_graph(g, feeds, True)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
    np.testing.assert_allclose(got["gw"], want["gw"], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# property tests: random elementwise / broadcast / reduce graphs, values and gradients
# ---------------------------------------------------------------------------------------------------------
UNARY = [F.tanh, F.sigmoid, F.relu, F.neg, F.abs, F.square, lambda x: F.exp(F.tanh(x)),
         lambda x: F.sqrt(F.add(F.abs(x), 1.0)), lambda x: F.log(F.add(F.square(x), 1.0)),
         lambda x: F.rsqrt(F.add(F.square(x), 0.5))]
BINARY = [F.add, F.sub, F.mul, lambda a, b: F.div(a, F.add(F.square(b), 1.0)), F.maximum, F.minimum,
          lambda a, b: F.select(F.greater(a, b), a, F.mul(b, 0.5))]


@st.composite
def random_programs(draw):
    nd = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=nd, max_size=nd)))
    n_params = draw(st.integers(1, 3))
    pshapes = []
    for _ in range(n_params):
        bmask = draw(st.lists(st.booleans(), min_size=nd, max_size=nd))
        drop_lead = draw(st.integers(0, nd))
        s = tuple(1 if m else d for m, d in zip(bmask, shape))[drop_lead:]
        pshapes.append(s)
    pshapes[0] = shape
    steps = []
    for k in range(draw(st.integers(1, 10))):
        kind = draw(st.sampled_from(["u", "b", "b", "r", "r"]))
        a = draw(st.integers(0, 100))
        b = draw(st.integers(0, 100))
        if kind == "u":
            steps.append(("u", draw(st.integers(0, len(UNARY) - 1)), a))
        elif kind == "b":
            steps.append(("b", draw(st.integers(0, len(BINARY) - 1)), a, b))
        else:
            axes = tuple(sorted(set(draw(st.lists(st.integers(0, nd - 1), min_size=1, max_size=nd)))))
            steps.append(("r", draw(st.sampled_from(["sum", "max", "mean"])), a, axes))
    seed = draw(st.integers(0, 2 ** 16))
    return shape, pshapes, steps, seed


def build_program(shape, pshapes, steps, seed):
    rng = np.random.default_rng(seed)
    params = [Parameter(rng.normal(size=s).astype(F32), name=f"p{k}") for k, s in enumerate(pshapes)]
    g = Graph("random")
    b = GraphBuilder(g)
    with building(b):
        x = b.input("x", shape, F32)
        vals = [F.mul(x, params[0])] + [F.add(p, 0.0) if p.shape != shape else F.mul(p, 1.5) for p in params[1:]]
        for stp in steps:
            if stp[0] == "u":
                vals.append(UNARY[stp[1]](vals[stp[2] % len(vals)]))
            elif stp[0] == "b":
                vals.append(BINARY[stp[1]](vals[stp[2] % len(vals)], vals[stp[3] % len(vals)]))
            else:
                v = vals[stp[2] % len(vals)]
                axes = tuple(a for a in stp[3] if a < v.ndim) or (v.ndim - 1,) if v.ndim else None
                if v.ndim == 0:
                    continue
                red = {"sum": F.reduce_sum, "max": F.reduce_max, "mean": F.reduce_mean}[stp[1]]
                r = red(v, axes, True)
                vals.append(F.sub(v, r) if stp[1] == "max" else F.mul(v, F.tanh(r)))   # broadcast back
        out = vals[-1]
        w = rng.normal(size=out.shape).astype(F32)
        loss = F.reduce_sum(F.mul(out, w))
        grads = grad(loss, params)
        g.outputs = {"out": out.node, "loss": loss.node}
        for k, gr in enumerate(grads):
            if gr.node is not None:
                g.outputs[f"g{k}"] = gr.node
    return g, {"x": rng.normal(size=shape).astype(F32)}


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(random_programs())
def test_random_graphs_fused_equals_unfused(prog):
    g, feeds = build_program(*prog)
    with kernels.backend("interp"):
        want = run_graph(g, feeds, False)
        got = run_graph(g, feeds, True)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-5, err_msg=k)


# ---------------------------------------------------------------------------------------------------------
# property tests: GEMM -> epilogue graphs (attention blocks), with consumers outside the fused groups
# ---------------------------------------------------------------------------------------------------------
TAP_VALUES = ("scores", "probs", "ctx")
TAP_KINDS = ("out", "view", "gemm", "sum")


@st.composite
def gemm_programs(draw):
    """Batched GEMM -> (scale, mask) -> softmax-like -> GEMM, residual, LayerNorm, mean over tokens; values of the
    block read again outside it (graph outputs, views, other GEMMs, reductions), optional in-place updates."""
    heads = draw(st.integers(1, 2))
    split = heads > 1 or draw(st.booleans())          # (B, H, S, dh) or (B, S, D) scores
    layer_norm = draw(st.booleans())
    # a LayerNorm over 2 features normalises to +-1 whatever its input: its input gradient is pure rounding
    # noise (a 1-ulp change of x moves it as much as fusion does), so it normalises at least 4
    min_dh = 4 // heads if layer_norm else 2
    return {
        "B": draw(st.integers(1, 3)), "S": draw(st.integers(1, 6)), "heads": heads, "split": split,
        "dh": draw(st.integers(min_dh, max(min_dh, 4))),
        "qkv": tuple(draw(st.sampled_from(["x", "dense", "dense_nobias"])) for _ in range(3)),
        "scores": draw(st.sampled_from(["tb", "explicit", "ta"])),
        "scale": draw(st.booleans()), "mask": draw(st.sampled_from([False, "param", "input", "queries"])),
        "norm": draw(st.sampled_from(["softmax", "log_softmax", "softmax_queries", "manual", "tanh"])),
        "dropout": draw(st.booleans()),
        "pv": draw(st.sampled_from(["plain", "ta"])),
        "out_proj": draw(st.booleans()), "residual": draw(st.booleans()), "layer_norm": layer_norm,
        "taps": tuple(sorted(set(draw(st.lists(st.tuples(st.sampled_from(TAP_VALUES), st.sampled_from(TAP_KINDS)),
                                               max_size=3))))),
        "update": draw(st.sampled_from(["none", "moment", "sgd_moment"])),
        "phases": draw(st.booleans()),
        "seed": draw(st.integers(0, 2 ** 16)),
    }


def _last2(t):
    return F.transpose(t, tuple(range(t.ndim - 2)) + (t.ndim - 1, t.ndim - 2))


def build_gemm_program(spec):
    """(graph, feeds, the Parameters it updates in place) for one ``gemm_programs`` example."""
    rng = np.random.default_rng(spec["seed"])
    B, S, H, dh = spec["B"], spec["S"], spec["heads"], spec["dh"]
    D = H * dh

    def param(name, shape, scale=0.5):
        return Parameter((rng.normal(size=shape) * scale).astype(F32), name=name)

    params: list = []

    def new_param(name, shape, scale=0.5):
        params.append(param(name, shape, scale))
        return params[-1]

    def phase(name):
        return core.annotate(phase=name) if spec["phases"] else contextlib.nullcontext()

    g = Graph("gemm_program")
    b = GraphBuilder(g)
    with building(b):
        x = b.input("x", (B, S, D), F32)
        with phase("forward"):
            def dense(t, name, bias=True):
                y = F.matmul(F.reshape(t, (B * S, D)), new_param(f"{name}.w", (D, D)))
                if bias:
                    y = F.add(y, new_param(f"{name}.b", (D,), 0.1))
                return F.reshape(y, (B, S, D))

            def heads(t):
                return F.transpose(F.reshape(t, (B, S, H, dh)), (0, 2, 1, 3)) if spec["split"] else t

            q, k, v = (heads(x if kind == "x" else dense(x, name, kind == "dense"))
                       for kind, name in zip(spec["qkv"], "qkv"))
            if spec["scores"] == "tb":
                scores = F.batch_matmul(q, k, transpose_b=True)
            elif spec["scores"] == "explicit":
                scores = F.batch_matmul(q, _last2(k))
            else:
                scores = F.batch_matmul(_last2(q), k, transpose_a=True, transpose_b=True)
            if spec["scale"]:
                scores = F.mul(scores, float(1.0 / np.sqrt(dh)))
            if spec["mask"]:       # a key mask (trained or fed) or one that varies over the queries too
                mshape = (B,) + (1,) * (scores.ndim - 2) + (S,)
                if spec["mask"] == "queries":
                    mshape = (B,) + (1,) * (scores.ndim - 3) + (S, S)
                mask = b.input("mask", mshape, F32) if spec["mask"] == "input" else new_param("mask", mshape, 1.0)
                scores = F.add(scores, mask)
            norm = spec["norm"]
            if norm == "softmax":
                probs = F.softmax(scores, -1)
            elif norm == "log_softmax":
                probs = F.log_softmax(scores, -1)
            elif norm == "softmax_queries":
                probs = F.softmax(scores, -2)
            elif norm == "manual":
                e = F.exp(F.sub(scores, F.reduce_max(scores, -1, True)))
                probs = F.div(e, F.reduce_sum(e, -1, True))
            else:
                probs = F.tanh(scores)
            if spec.get("dropout"):  # on the probabilities (attention dropout), a generator per program
                probs = F.dropout(probs, 0.75, np.random.default_rng(spec["seed"] + 1))
            ctx = F.batch_matmul(probs, v) if spec["pv"] == "plain" else \
                F.batch_matmul(_last2(probs), v, transpose_a=True)
            if spec["split"]:
                ctx = F.reshape(F.transpose(ctx, (0, 2, 1, 3)), (B, S, D))
            a = dense(ctx, "o") if spec["out_proj"] else ctx
            y = F.add(x, a) if spec["residual"] else a
            if spec["layer_norm"]:
                y = F.layer_norm(y, new_param("gamma", (D,), 1.0), new_param("beta", (D,), 0.1), 1e-5)
            head = F.reduce_mean(y, 1)                                   # mean over tokens
            loss = F.reduce_sum(F.mul(head, rng.normal(size=head.shape).astype(F32)))
            outputs = {"head": head}
            values = {"scores": scores, "probs": probs, "ctx": ctx}
            for name, kind in spec["taps"]:
                t = values[name]
                rows = F.reshape(t, (-1, t.shape[-1]))
                if kind == "out":
                    outputs[f"{name}.out"] = t
                elif kind == "view":
                    outputs[f"{name}.view"] = rows
                elif kind == "gemm":          # read by a GEMM outside any fused group
                    tap = F.matmul(rows, param(f"tap.{name}", (t.shape[-1], 3)))
                    outputs[f"{name}.gemm"] = tap
                    loss = F.add(loss, F.reduce_sum(F.mul(tap, 0.1)))
                else:
                    loss = F.add(loss, F.mul(F.reduce_sum(F.mul(t, t)), 0.01))
            outputs["loss"] = loss
        with phase("backward"):
            grads = grad(loss, params + [x])
        for k, gr in enumerate(grads):
            if gr.node is not None:
                outputs[f"grad{k}"] = gr
        updated = []
        if spec["update"] != "none":
            with phase("update"):
                for k, (p, gr) in enumerate(zip(params, grads)):
                    if gr.node is None:
                        continue
                    gg = F.mul(gr, gr)
                    outputs[f"gnorm{k}"] = F.reduce_sum(gg)
                    m = param(f"m{k}", p.shape, 0.0)
                    F.assign(m, F.add(F.mul(m, 0.9), F.mul(gg, 0.1)))
                    updated.append(m)
                    if spec["update"] == "sgd_moment":
                        F.assign(p, F.sub(p, F.mul(gr, 0.05)))
                        updated.append(p)
        g.outputs = {name: t.node for name, t in outputs.items()}
    feeds = {"x": rng.normal(size=(B, S, D)).astype(F32)}
    if spec["mask"] == "input":
        feeds["mask"] = np.where(rng.random(g.inputs[1].shape) < 0.3, -1e4, 0.0).astype(F32)
    return g, feeds, updated


def attention_fusable(spec) -> bool:
    """Whether a ``gemm_programs`` example is exactly the attention pattern (``fuse_attention`` must take it):
    q kT (not an explicit transpose), softmax over the keys, p v, a key mask if any, and no value of the
    scores / probabilities read outside the pattern. A trained mask needs its gradient summed over the queries:
    with one query that sum is no reduction, and the score gradient itself is read (not the pattern)."""
    return (spec["scores"] == "tb" and spec["norm"] == "softmax" and spec["pv"] == "plain"
            and spec["mask"] != "queries" and not (spec["mask"] == "param" and spec["S"] == 1)
            and not any(name in ("scores", "probs") for name, _ in spec["taps"]))


def _run_gemm_program(spec, fuse_it):
    g, feeds, updated = build_gemm_program(spec)
    if fuse_it:       # the attention pattern becomes the tiled kernels exactly when it is the pattern
        fused = [n.op for n in graph_kernel(dce(g)).nodes]
        assert fused.count("fused_attention_fwd") == attention_fusable(spec), spec
        assert fused.count("fused_attention_grad") == attention_fusable(spec), spec
    out = run_graph(g, feeds, fuse_it)
    out.update({f"var.{p.name}": p.data.copy() for p in updated})
    return out


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(gemm_programs())
def test_random_gemm_epilogue_graphs_fused_equals_unfused(spec):
    with kernels.backend("interp"):
        want = _run_gemm_program(spec, False)
        got = _run_gemm_program(spec, True)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-5, err_msg=k)


def _seeded_program(seed):
    r = np.random.default_rng(seed)
    nd = int(r.integers(1, 4))
    shape = tuple(int(d) for d in r.integers(2, 40, nd))
    pshapes = [shape] + [tuple(1 if m else d for m, d in zip(r.random(nd) < 0.5, shape))[int(r.integers(0, nd)):]
                         for _ in range(int(r.integers(0, 3)))]
    steps = []
    for _ in range(int(r.integers(6, 14))):
        kind = r.choice(["u", "b", "b", "r"])
        a, b = int(r.integers(0, 100)), int(r.integers(0, 100))
        if kind == "u":
            steps.append(("u", int(r.integers(0, len(UNARY))), a))
        elif kind == "b":
            steps.append(("b", int(r.integers(0, len(BINARY))), a, b))
        else:
            axes = tuple(sorted({int(x) for x in r.integers(0, nd, int(r.integers(1, nd + 1)))}))
            steps.append(("r", str(r.choice(["sum", "max", "mean"])), a, axes))
    return shape, pshapes, steps, seed


def test_random_graphs_compiled_equals_interpreter():
    if not kernels.compiler_available():
        pytest.skip("no C compiler")
    for seed in range(8):
        g, feeds = build_program(*_seeded_program(seed))
        with kernels.backend("c"):
            a = run_graph(g, feeds, True)
        with kernels.backend("interp"):
            b = run_graph(g, feeds, True)
        with kernels.backend("interp"):
            c = run_graph(g, feeds, False)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
            np.testing.assert_allclose(a[k], c[k], rtol=2e-5, atol=2e-5, err_msg=k)


def test_select_on_a_comparison_kept_in_the_chunk_cache_compiles(rng):
    """c = exp(tanh x) > 1.5 feeds a reduction (phase 0) and a select after it (phase 1), which reads c from the
    per-chunk cache: the select's compare-mask shortcut must not name operands that phase never computed."""
    g = Graph("sel_cache")
    b = GraphBuilder(g)
    with building(b):
        x = b.input("x", (64, 64), F32)
        e = F.exp(F.tanh(x))
        c = F.greater(e, 1.5)
        s = F.reduce_sum(F.select(c, e, F.mul(x, 0.0)), -1, True)
        g.outputs = {"y": F.select(c, F.div(e, F.add(s, 1.0)), x).node}
    fused = graph_kernel(dce(g))
    (node,) = [n for n in fused.nodes if n.op == "fused"]
    assert node.ann["fused_ops"] == ["tanh", "exp", "greater", "mul", "select", "reduce_sum", "add", "div", "select"]
    feeds = {"x": rng.normal(size=(64, 64)).astype(F32)}
    with kernels.backend("interp"):
        want, ref = run_graph(g, feeds, True)["y"], run_graph(g, feeds, False)["y"]
    if kernels.compiler_available():
        with kernels.backend("c"):           # raises if the kernel does not compile
            np.testing.assert_array_equal(run_graph(g, feeds, True)["y"], want)
    np.testing.assert_allclose(want, ref, rtol=1e-6, atol=1e-6)


def _seeded_gemm_spec(seed):
    r = np.random.default_rng(seed)
    heads = int(r.integers(1, 3))
    return {"B": int(r.integers(2, 5)), "S": int(r.integers(8, 40)), "heads": heads,
            "split": heads > 1 or bool(r.integers(2)), "dh": int(r.integers(4, 17)),
            "qkv": tuple(str(r.choice(["x", "dense", "dense_nobias"])) for _ in range(3)),
            "scores": str(r.choice(["tb", "explicit", "ta"])), "scale": bool(r.integers(2)),
            "mask": [False, "param", "input", "queries"][int(r.integers(4))], "dropout": bool(r.integers(2)),
            "norm": str(r.choice(["softmax", "log_softmax", "softmax_queries", "manual"])),
            "pv": str(r.choice(["plain", "ta"])), "out_proj": bool(r.integers(2)), "residual": True, "layer_norm": True,
            "taps": ((str(r.choice(TAP_VALUES)), str(r.choice(TAP_KINDS))),),
            "update": str(r.choice(["none", "moment", "sgd_moment"])), "phases": bool(r.integers(2)), "seed": seed}


def test_attention_graphs_compiled_equals_interpreter():
    """The GEMM-epilogue programs at sizes where the kernels chunk and use lanes: C and interpreter agree bit for
    bit (prologue GEMMs included), and both agree with the unfused graph."""
    if not kernels.compiler_available():
        pytest.skip("no C compiler")
    for seed in range(4):
        spec = _seeded_gemm_spec(seed)
        with kernels.backend("c"):
            a = _run_gemm_program(spec, True)
        with kernels.backend("interp"):
            b = _run_gemm_program(spec, True)
            c = _run_gemm_program(spec, False)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
            np.testing.assert_allclose(a[k], c[k], rtol=1e-4, atol=1e-4, err_msg=k)


# ---------------------------------------------------------------------------------------------------------
# structure: cycles, effects, simplification, dumps
# ---------------------------------------------------------------------------------------------------------
def test_diamond_through_an_opaque_op_is_not_fused_into_a_cycle(rng):
    """a = tanh(x); b = a @ W (opaque); c = a * b: fusing a with c would need b inside the group."""
    g = Graph("diamond")
    b_ = GraphBuilder(g)
    W = Parameter(rng.normal(size=(16, 16)).astype(F32), name="W")
    with building(b_):
        x = b_.input("x", (16, 16), F32)
        a = F.tanh(F.add(x, 1.0))
        bb = F.matmul(a, W)
        c = F.mul(F.exp(F.neg(a)), bb)
        d = F.reduce_sum(F.mul(c, a), -1)
        g.outputs = {"d": d.node}
    fused = graph_kernel(dce(g))
    fused.verify()
    groups = [n.ann["fused_ops"] for n in fused.nodes if n.op == "fused"]
    # exp(-a) may join a's kernel (it does not depend on b), but c = . * b and everything after it may not;
    # the matmul itself may run as the GEMM prologue of the second kernel
    assert len(groups) == 2, groups
    first = next(g for g in groups if "tanh" in g)
    assert "mul" not in first and "matmul" not in first and "reduce_sum" not in first, groups
    second = next(g for g in groups if "tanh" not in g)
    assert second[0] == "matmul" and "reduce_sum" in second, groups
    feeds = {"x": rng.normal(size=(16, 16)).astype(F32)}
    np.testing.assert_allclose(run_graph(g, feeds, True)["d"], run_graph(g, feeds, False)["d"], rtol=1e-5)


def _scores_graph(rng, outside_reader: bool):
    """softmax(reshape(q @ kT)); with ``outside_reader`` the reshape is also read by a GEMM outside the group."""
    g = Graph("scores")
    b = GraphBuilder(g)
    W = Parameter(rng.normal(size=(8, 5)).astype(F32), name="W")
    with building(b):
        q, k = b.input("q", (2, 8, 4), F32), b.input("k", (2, 8, 4), F32)
        rows = F.reshape(F.batch_matmul(q, k, transpose_b=True), (16, 8))
        g.outputs = {"p": F.softmax(rows, -1).node}
        if outside_reader:
            g.outputs["o"] = F.matmul(rows, W).node
    feeds = {"q": rng.normal(size=(2, 8, 4)).astype(F32), "k": rng.normal(size=(2, 8, 4)).astype(F32)}
    return g, feeds


def test_gemm_is_a_prologue_only_when_the_kernel_is_its_only_reader(rng):
    g, feeds = _scores_graph(rng, outside_reader=False)
    fused = graph_kernel(dce(g))
    (node,) = [n for n in fused.nodes if n.op == "fused"]
    assert node.ann["fused_ops"][:3] == ["batch_matmul", "reshape", "reduce_max"]
    assert node.attrs["_prologue"] == (("batch_matmul", False, True),)
    assert not any(n.op == "batch_matmul" for n in fused.nodes)
    np.testing.assert_allclose(run_graph(g, feeds, True)["p"], run_graph(g, feeds, False)["p"], rtol=1e-6)


def test_gemm_read_through_a_view_outside_the_group_stays_a_node(rng):
    """The reshape of q @ kT is a member of the softmax kernel and read by another GEMM: the batch_matmul must
    keep its node (it was folded into the kernel as its prologue, leaving the exported reshape dangling)."""
    g, feeds = _scores_graph(rng, outside_reader=True)
    fused = graph_kernel(dce(g))
    (node,) = [n for n in fused.nodes if n.op == "fused"]
    (bmm,) = [n for n in fused.nodes if n.op == "batch_matmul"]
    assert "_prologue" not in node.attrs and node.inputs == [bmm]
    assert node.ann["fused_ops"] == ["reshape", "reduce_max", "sub", "exp", "reduce_sum", "reciprocal", "mul"]
    (view,) = [n for n in fused.nodes if n.op == "reshape"]
    assert view.inputs == [bmm] and [n.op for n in fused.nodes if view in n.inputs] == ["matmul"]
    got, want = run_graph(g, feeds, True), run_graph(g, feeds, False)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_gemm_read_by_an_in_place_kernel_stays_a_node(rng):
    """gg = (a @ c)^2 feeds a reduction (main kernel) and a moment update (in-place kernel): both read the GEMM."""
    g = Graph("inplace_gemm")
    b = GraphBuilder(g)
    m = Parameter(rng.normal(size=(8, 5)).astype(F32), name="m")
    m0 = m.data.copy()
    with building(b):
        a, c = b.input("a", (8, 6), F32), b.input("c", (6, 5), F32)
        gg = F.square(F.matmul(a, c))
        F.assign(m, F.add(F.mul(m, 0.9), F.mul(gg, 0.1)))
        g.outputs = {"n": F.reduce_sum(gg).node}
    fused = graph_kernel(dce(g))
    (mm,) = [n for n in fused.nodes if n.op == "matmul"]
    assert sorted(n.op for n in fused.nodes if mm in n.inputs) == ["fused", "fused_assign"]
    assert not any(n.attrs.get("_prologue") for n in fused.nodes)
    av, cv = rng.normal(size=(8, 6)).astype(F32), rng.normal(size=(6, 5)).astype(F32)
    out = run_graph(g, {"a": av, "c": cv}, True)
    want = np.square(av @ cv)
    np.testing.assert_allclose(out["n"], want.sum(), rtol=1e-5)
    np.testing.assert_allclose(m.data, m0 * F32(0.9) + want * F32(0.1), rtol=1e-5, atol=1e-6)


def test_update_ordering_is_kept_for_readers_of_a_variable(rng):
    """v is read before and after its in-place update: the reader after sees the new value."""
    g = Graph("effects")
    b = GraphBuilder(g)
    v = Parameter(rng.normal(size=(32, 8)).astype(F32), name="v")
    v0 = v.data.copy()
    with building(b):
        x = b.input("x", (32, 8), F32)
        before = F.mul(F.add(v, x), 2.0)            # reads the old value
        F.assign(v, F.add(F.mul(v, 0.5), x))         # in place
        after = F.mul(F.add(v, 1.0), before)         # reads the new value
        g.outputs = {"after": after.node, "before": before.node}
    xv = rng.normal(size=(32, 8)).astype(F32)
    fused = graph_kernel(dce(g))
    (upd,) = [n for n in fused.nodes if n.op == "fused_assign"]
    assert upd.inputs[0].attrs["_var"] is v and "assign" not in [n.op for n in fused.nodes]
    order = [n.op for n in fused.nodes if n.op in ("fused", "fused_assign")]
    assert order == ["fused", "fused_assign", "fused"], fused.dump()      # before, the update, after
    out = run_graph(g, {"x": xv}, True)
    new = v0 * F32(0.5) + xv
    np.testing.assert_allclose(v.data, new, rtol=1e-6)
    np.testing.assert_allclose(out["before"], (v0 + xv) * 2, rtol=1e-6)
    np.testing.assert_allclose(out["after"], (new + 1) * ((v0 + xv) * 2), rtol=1e-5)


def test_in_place_updates_reading_an_old_value_keep_their_order(rng):
    """b's update reads a's old value; a is overwritten first: the kernels must not read the new a."""
    g = Graph("two_vars")
    b = GraphBuilder(g)
    a = Parameter(rng.normal(size=(64, 8)).astype(F32), name="a")
    w = Parameter(rng.normal(size=(64, 8)).astype(F32), name="w")
    a0, w0 = a.data.copy(), w.data.copy()
    with building(b):
        x = b.input("x", (64, 8), F32)
        t = F.mul(a, 2.0)                             # reads the old a
        F.assign(a, F.add(F.mul(a, 0.5), x))
        F.assign(w, F.add(w, F.tanh(t)))
        g.outputs = {"t": t.node}
    xv = rng.normal(size=(64, 8)).astype(F32)
    run_graph(g, {"x": xv}, True)
    np.testing.assert_allclose(a.data, a0 * F32(0.5) + xv, rtol=1e-6)
    np.testing.assert_allclose(w.data, w0 + np.tanh(a0 * 2), rtol=2e-6, atol=1e-6)


def test_simplify_algebra_cse_and_folding():
    def build():
        g = Graph("s")
        b = GraphBuilder(g)
        with building(b):
            x = b.input("x", (4, 6), F32)
            y = F.add(F.mul(x, 1.0), 0.0)
            y = F.div(F.sub(y, 0.0), 1.0)
            y = F.neg(F.neg(y))
            y = F.reshape(F.reshape(y, (24,)), (4, 6))
            c = F.mul(F.add(F.zeros_like(x), 2.0), 3.0)                   # constant: folded
            t1, t2 = F.tanh(y), F.tanh(y)                                   # CSE
            g.outputs = {"z": F.add(F.mul(t1, c), t2).node}
        return g
    s = simplify(expand(dce(build())))        # the passes rewrite the nodes they are given
    ops = [n.op for n in s.nodes]
    assert ops.count("tanh") == 1 and "neg" not in ops and "reshape" not in ops and "div" not in ops
    assert ops.count("const") == 1 and ops.count("mul") == 1 and ops.count("add") == 1
    xv = np.arange(24, dtype=F32).reshape(4, 6) / 10
    np.testing.assert_allclose(run_graph(build(), {"x": xv}, True)["z"], np.tanh(xv) * 7, rtol=1e-6)


def test_dumps_before_and_after(tmp_path):
    g = Graph("dumped")
    b = GraphBuilder(g)
    with building(b):
        x = b.input("x", (64, 32), F32)
        g.outputs = {"y": F.softmax(F.mul(F.add(x, 1.0), 0.5), -1).node}
    before, after, fused = dumps(dce(g))
    assert "softmax" in before and "fused(" in after and "softmax" not in after
    graph_kernel(dce(g), dump_dir=tmp_path)
    assert "fused(" in (tmp_path / "dumped.after.txt").read_text()
    assert "softmax(" in (tmp_path / "dumped.before.txt").read_text()
    node = next(n for n in fused.nodes if n.op == "fused")
    assert node.name.startswith("Fused_") and node.ann["fused_ops"][:2] == ["add", "mul"]


def test_fused_graph_is_valid_for_the_rest_of_the_pipeline(digits):
    make, batches = _mlp(digits)
    context.set_context(seed=0, enable_graph_kernel=True)
    net, loss, opt = make()
    model = Model(net, loss, opt, progress=False)
    graph = model.build_train_graph(*batches[0])
    fused = graph_kernel(dce(graph))
    fused.verify()
    assert not any(n.deps for n in fused.nodes)                  # ordering is order_effects' job
    ordered = order_effects(fused)
    ordered.verify()
    # what fusion makes of the MLP step (Adam, dropout): each hidden layer is ONE task (GEMM + bias + relu +
    # dropout mask rebuilt from the uniform draw), the logits GEMM carries the cross entropy, the backward
    # GEMM dX = dY W carries the dropout / relu backward and the bias gradient, and every optimizer update of
    # the 6 parameters, their 12 moments and Adam's 2 beta powers is computed in place
    grouped = fuse(simplify(expand(dce(graph))))
    kernels = [n for n in grouped.nodes if n.op == "fused"]
    ops = [n.ann["fused_ops"] for n in kernels]
    assert ops.count(["matmul", "add", "relu", "less", "select", "mul"]) == 2, ops
    assert sum(o[:2] == ["matmul", "add"] and {"reduce_max", "exp", "log"} <= set(o) for o in ops) == 1, ops
    assert ops.count(["matmul", "less", "select", "mul", "greater", "cast", "mul", "reduce_sum"]) == 2, ops
    assert len(kernels) == 8 and [n.op for n in grouped.nodes].count("matmul") == 3   # the weight gradients
    updated = {n.inputs[0].id for n in grouped.nodes if n.op == "fused_assign"}
    assert len(updated) == [n.op for n in graph.nodes].count("assign") == 20
    assert "assign" not in [n.op for n in grouped.nodes]
    # a kernel with several outputs is unpacked once per output; the gets read nothing else
    for k in kernels:
        gets = [g for g in grouped.nodes if g.op == "fused_get" and g.inputs == [k]]
        assert sorted(g.attrs["index"] for g in gets) == list(range(len(gets))) and len(gets) != 1


# ---------------------------------------------------------------------------------------------------------
# the on-disk kernel cache
# ---------------------------------------------------------------------------------------------------------
_CACHE_SCRIPT = r"""
import numpy as np, sys
from runtime.core import GraphBuilder, building
from runtime.ir.graph import Graph
from runtime.ops import api as F
from runtime.passes.graph_kernel import graph_kernel
g = Graph("cache_probe"); b = GraphBuilder(g)
with building(b):
    x = b.input("x", (33, 17), np.float32)
    g.outputs = {"y": F.tanh(F.mul(F.add(x, float(sys.argv[1])), 1.25)).node}
fg = graph_kernel(g)
node = next(n for n in fg.nodes if n.op == "fused")
assert node.attrs["_program"].backend() == "c"
xv = np.linspace(-1, 1, 33 * 17, dtype=np.float32).reshape(33, 17)
print(float(node.attrs["_program"](xv).sum()))
"""


def test_kernel_cache_is_shared_between_processes(tmp_path):
    if not kernels.compiler_available():
        pytest.skip("no C compiler")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", _CACHE_SCRIPT, "0.5"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]   # concurrent builders
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert outs[0][0] == outs[1][0]
    kdir = tmp_path / "insight" / "kernels"
    entries = sorted(p.name for p in kdir.iterdir() if not p.name.startswith("."))
    assert any(e.startswith("fk_") for e in entries) and any(e.startswith("batch_") for e in entries)
    mtimes = {p.name: p.lstat().st_mtime_ns for p in kdir.iterdir()}
    # another constant is a different kernel (constants are compiled in); the same one is loaded, not rebuilt
    r = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, "0.5"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout == outs[0][0]
    assert {p.name: p.lstat().st_mtime_ns for p in kdir.iterdir()} == mtimes


def test_profiler_op_table_shows_fused_ops_and_fewer_launches(tmp_path):
    """What a user sees: the op table of a profiled BERT step lists Fused_* kernels with their original ops,
    and the step launches fewer kernels than without fusion."""
    import insight
    from insight import analysis

    make, batches = _bert(None)
    launches, tables = {}, {}
    for fused in (False, True):
        context.set_context(seed=0, enable_graph_kernel=fused)
        net, loss, opt = make()
        model = Model(net, loss, opt, progress=False)
        model.train_step(*batches[0])  # compile outside the profile
        run_dir = tmp_path / ("fused" if fused else "plain")
        with insight.Profiler(output_path=str(run_dir)):
            for k in range(3):
                model.train_step(*batches[k % len(batches)])
        context.set_context(enable_graph_kernel=False)
        ops = analysis.op_stats(str(run_dir), kinds=("kernel",))
        tables[fused] = ops
        launches[fused] = int(ops["calls"].sum()) / 3
    assert launches[True] < 0.5 * launches[False], launches
    t = tables[True]
    fused_rows = t[t["op"].isin(["fused", "fused_assign"])]  # (fused_get rows unpack a kernel's outputs)
    assert len(fused_rows) and fused_rows["name"].str.startswith("Fused_").all()
    assert (fused_rows["fused_ops"].str.len() > 0).all() and fused_rows["fused_ops"].str.contains("exp").any()
    assert not tables[False]["name"].str.startswith("Fused_").any()
    # the fused kernels' cached output buffers are device memory held between steps: pool rows of their own
    mem = pd.read_parquet(tmp_path / "fused" / "rank_0" / "memory")  # the table's part files
    pool = mem[mem["source"] == "pool"]
    assert {"parameter", "activation_reserve", "kernel_pool"} <= set(pool["kind"])
    assert set(mem.loc[mem["source"] == "planned", "kind"]) == {"activation"}
