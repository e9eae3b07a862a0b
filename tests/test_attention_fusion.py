"""Attention fusion: the tiled flash-style kernels (``runtime/_kernels_attention.pyx``) against a numpy
reference, float64 finite-difference checks of ``fused_attention`` (graph and eager), the pattern pass
(``runtime/passes/graph_kernel/attention.py``): exact matches with masks, dropout and the backward, clean
fallbacks when the graph differs, and what the profiler shows for a fused BERT step."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradcheck_util import check_gradients, param
from runtime import Model, _kernels_attention as KA, codegen, context
from runtime.autodiff import grad
from runtime.core import GraphBuilder, Tensor, building
from runtime.ir.graph import Graph
from runtime.ops import ShapeError, api as F
from runtime.ops.attention import fused_attention
from runtime.passes.dce import dce
from runtime.passes.graph_kernel import attention as attention_pass, clone, fuse_attention, graph_kernel
from test_fusion import _bert, attention_fusable, build_gemm_program, gemm_programs, run_graph, train_losses

F32 = np.float32


# ---------------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------------
def reference(q, k, v, mask, u, scale, keep):
    """(O, P, Pd) in the input precision, the unfused math."""
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * q.dtype.type(scale)
    if mask is not None:
        s = s + mask
    e = np.exp(s - s.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    pd = p if u is None else p * ((u < np.float32(keep)) * np.asarray(1.0 / keep, q.dtype))
    return pd @ v, p, pd


def reference_grads(q, k, v, u, p, pd, do, scale, keep):
    dpd = do @ np.swapaxes(v, -1, -2)
    dp = dpd if u is None else dpd * ((u < np.float32(keep)) * np.asarray(1.0 / keep, q.dtype))
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    return (ds * scale) @ k, np.swapaxes(ds * scale, -1, -2) @ q, np.swapaxes(pd, -1, -2) @ do, ds.sum(-2)


@pytest.fixture(params=[0, 1, 2], ids=["baseline", "avx2", "avx512"])
def level(request):
    """Each build of the tile GEMM / exp the CPU runs (a level it lacks is skipped)."""
    got = KA.use_level(request.param)
    try:
        if got != request.param:
            pytest.skip(f"the CPU has no level {request.param} (runs {got})")
        yield got
    finally:
        KA.use_level(-1)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 3e-6), (np.float64, 1e-13)])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 4, 4), (2, 2, 70, 130, 8, 5), (1, 1, 64, 64, 16, 16),
                                   (3, 1, 129, 1, 3, 2)])
@pytest.mark.parametrize("variant", ["plain", "mask", "mask_dropout", "dropout"])
def test_kernels_match_the_unfused_math(dtype, tol, shape, variant, level):
    """Sizes below, at and across the 64-row / 64-key tiles, Dv != D, a transposed (head-split) q view."""
    B, H, Sq, Sk, D, Dv = shape
    rng = np.random.default_rng(sum(shape))
    q = rng.normal(size=(B, Sq, H, D)).astype(dtype).transpose(0, 2, 1, 3)     # strided like split heads
    k, v = rng.normal(size=(B, H, Sk, D)).astype(dtype), rng.normal(size=(B, H, Sk, Dv)).astype(dtype)
    mask = np.where(rng.random((B, 1, 1, Sk)) < 0.3, -1e4, rng.normal(size=(B, 1, 1, Sk))).astype(dtype) \
        if "mask" in variant else None
    u = rng.random((B, H, Sq, Sk), dtype=np.float32) if "dropout" in variant else None
    o, lse = KA.attention_fwd(q, k, v, mask, u, 0.3, 0.8)
    want, p, pd = reference(q, k, v, mask, u, 0.3, 0.8)
    np.testing.assert_allclose(o, want, rtol=tol, atol=tol)
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * dtype(0.3) + (0 if mask is None else mask)
    np.testing.assert_allclose(lse, np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1), rtol=tol,
                               atol=tol)
    do = rng.normal(size=o.shape).astype(dtype)
    got = KA.attention_bwd(q, k, v, mask, u, o, lse, do, 0.3, 0.8, mask is not None)
    wants = reference_grads(q, k, v, u, p, pd, do, 0.3, 0.8)
    for name, g, w in zip(("dq", "dk", "dv", "dmask"), got, wants):
        if g is not None:
            np.testing.assert_allclose(g, w, rtol=10 * tol, atol=10 * tol, err_msg=name)
    assert (got[3] is None) == (mask is None)
    # the short-sequence variant: the forward stores P (all keys in one tile), the backward reads it
    o_p, lse_p, p_stored = KA.attention_fwd(q, k, v, mask, u, 0.3, 0.8, store_p=True)
    np.testing.assert_allclose(o_p, want, rtol=tol, atol=tol)
    np.testing.assert_allclose(lse_p, lse, rtol=tol, atol=tol)
    np.testing.assert_allclose(p_stored, p, rtol=tol, atol=tol)
    got_p = KA.attention_bwd(q, k, v, mask, u, o_p, None, do, 0.3, 0.8, mask is not None, p=p_stored)
    for name, g, w in zip(("dq", "dk", "dv", "dmask"), got_p, wants):
        if g is not None:
            np.testing.assert_allclose(g, w, rtol=10 * tol, atol=10 * tol, err_msg=f"{name} (stored P)")
    # heads merged back: O and the gradients written as (B, S, H, D), bit for bit the same values
    o_m = KA.attention_fwd(q, k, v, mask, u, 0.3, 0.8, out_bshd=True)[0]
    assert o_m.shape == (B, Sq, H, Dv) and o_m.flags.c_contiguous
    np.testing.assert_array_equal(o_m.transpose(0, 2, 1, 3), o)
    got_m = KA.attention_bwd(q, k, v, mask, u, o_m.transpose(0, 2, 1, 3), lse, do, 0.3, 0.8, mask is not None,
                             grads_bshd=(True, False, True))
    np.testing.assert_array_equal(got_m[0].transpose(0, 2, 1, 3), got[0])
    np.testing.assert_array_equal(got_m[1], got[1])
    np.testing.assert_array_equal(got_m[2].transpose(0, 2, 1, 3), got[2])
    assert got_m[0].flags.c_contiguous and got_m[2].shape == (B, Sk, H, Dv)


def test_rows_masked_with_minus_infinity_ignore_those_keys():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(1, 1, 6, 4)).astype(F32) for _ in range(3))
    mask = np.zeros((1, 1, 1, 6), F32)
    mask[..., 3:] = -np.inf
    o, _ = KA.attention_fwd(q, k, v, mask, None, 0.5, 1.0)
    want, p, _ = reference(q, k[..., :3, :], v[..., :3, :], None, None, 0.5, 1.0)
    np.testing.assert_allclose(o, want, rtol=1e-6, atol=1e-6)
    o_p, _, p_stored = KA.attention_fwd(q, k, v, mask, None, 0.5, 1.0, store_p=True)
    np.testing.assert_allclose(o_p, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(p_stored[..., :3], p, rtol=1e-6, atol=1e-6)
    assert (p_stored[..., 3:] == 0).all()


@pytest.mark.parametrize("store_p", [False, True])
def test_rows_whose_keys_are_all_masked_keep_their_gradient_precision(store_p):
    """A sequence that is all padding: every score of its rows sits near -1e4, where float32's spacing is 1e-3.
    The backward must not lose that much recomputing P = exp(s - lse) (it did with a float32 lse)."""
    rng = np.random.default_rng(3)
    q, k, v, do = (rng.normal(size=(2, 2, 5, 8)).astype(F32) for _ in range(4))
    mask = np.zeros((2, 1, 1, 5), F32)
    mask[1] = -1e4                                      # the second sequence: every key masked
    want, p, pd = reference(q, k, v, mask, None, 0.7, 1.0)
    if store_p:
        o, _, p_stored = KA.attention_fwd(q, k, v, mask, None, 0.7, 1.0, store_p=True)
        got = KA.attention_bwd(q, k, v, mask, None, o, None, do, 0.7, 1.0, True, p=p_stored)
    else:
        o, lse = KA.attention_fwd(q, k, v, mask, None, 0.7, 1.0)
        assert lse.dtype == np.float64
        got = KA.attention_bwd(q, k, v, mask, None, o, lse, do, 0.7, 1.0, True)
    np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-5)
    for name, g, w in zip(("dq", "dk", "dv", "dmask"), got, reference_grads(q, k, v, None, p, pd, do, 0.7, 1.0)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5, err_msg=name)


# ---------------------------------------------------------------------------------------------------------
# the primitives: float64 finite differences (GRAPH and PYNATIVE), shape errors
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["plain", "mask", "mask_dropout", "three_d"])
def test_fused_attention_gradients_float64(variant):
    """fused_attention's backward (fused_attention_fwd for the row statistics + fused_attention_grad) against
    central differences, through the IR autodiff and the eager tape."""
    rng = np.random.default_rng(3)
    lead = (2,) if variant == "three_d" else (2, 2)
    q = param(rng.normal(size=lead + (5, 3)), "q")
    k = param(rng.normal(size=lead + (7, 3)), "k")
    v = param(rng.normal(size=lead + (7, 4)), "v")
    mask = param(rng.normal(size=(2, 1, 1, 7)[-len(lead) - 2:]), "mask")
    u = Tensor(rng.random(lead + (5, 7), dtype=np.float32))
    params = [q, k, v] + ([mask] if variant != "plain" else [])
    if variant == "plain":
        def fn(): return fused_attention(q, k, v, None, 0.7)
    elif variant == "mask_dropout":
        def fn(): return fused_attention(q, k, v, mask, 0.7, u=u, keep_prob=0.75)
    else:
        def fn(): return fused_attention(q, k, v, mask, 0.7)
    check_gradients(fn, params)


def test_bad_shapes_name_the_op_and_the_shapes():
    x = np.zeros((2, 2, 5, 3), F32)
    with pytest.raises(ShapeError, match=r"fused_attention: q \(2, 2, 5, 3\), k \(2, 2, 7, 4\)"):
        fused_attention(x, np.zeros((2, 2, 7, 4), F32), np.zeros((2, 2, 7, 4), F32))
    with pytest.raises(ShapeError, match="constant over the queries"):
        fused_attention(x, x, x, np.zeros((2, 1, 5, 5), F32))
    with pytest.raises(ShapeError, match="share a float32 / float64 dtype"):
        fused_attention(x, x.astype(np.float64), x)


# ---------------------------------------------------------------------------------------------------------
# the pass: exact matches and fallbacks
# ---------------------------------------------------------------------------------------------------------
def _mha_graph(rng, B=2, H=2, S=9, dh=4, *, mask="input", dropout=True, tap=None, axis=-1):
    """Split-head attention like MultiHeadAttention (+ optional key mask / dropout) with its backward."""
    g = Graph("mha")
    b = GraphBuilder(g)
    D = H * dh
    ws = [param(rng.normal(size=(D, D)) * 0.4, n).data.astype(F32) for n in "qkv"]
    with building(b):
        x = b.input("x", (B, S, D), F32)
        m = b.input("mask", (B, 1, 1, S), F32) if mask == "input" else None
        if mask == "queries":
            m = b.input("mask", (B, 1, S, S), F32)
        wq, wk, wv = (Tensor(w) for w in ws)
        heads = [F.transpose(F.reshape(F.matmul(F.reshape(x, (B * S, D)), w), (B, S, H, dh)), (0, 2, 1, 3))
                 for w in (wq, wk, wv)]
        s = F.mul(F.batch_matmul(heads[0], heads[1], transpose_b=True), 0.5)
        if m is not None:
            s = F.add(s, m)
        p = F.softmax(s, axis)
        if dropout:
            p = F.dropout(p, 0.8, np.random.default_rng(7))
        o = F.batch_matmul(p, heads[2])
        loss = F.reduce_sum(F.mul(o, o))
        gx, = grad(loss, [x])
        g.outputs = {"loss": loss.node, "gx": gx.node}
        if tap == "probs":
            g.outputs["probs"] = p.node
    feeds = {"x": rng.normal(size=(B, S, D)).astype(F32)}
    if m is not None:
        feeds["mask"] = np.where(rng.random(m.shape) < 0.3, -1e4, 0.0).astype(F32)
    return g, feeds


def _ops(g):
    return [n.op for n in g.nodes]


@pytest.fixture(params=["store_p", "recompute"])
def saved(request, monkeypatch):
    """Both ways the backward gets the probabilities: stored by the forward (short sequences, the default at
    these sizes) or recomputed per tile from the row log-sum-exp (``STORE_P_MAX_KEYS`` = 0)."""
    if request.param == "recompute":
        monkeypatch.setattr(attention_pass, "STORE_P_MAX_KEYS", 0)
    return request.param


def test_attention_with_mask_dropout_and_backward_becomes_two_kernels(saved):
    g, feeds = _mha_graph(np.random.default_rng(0))
    fused = fuse_attention(clone(dce(g)))
    ops = _ops(fused)
    assert ops.count("fused_attention_fwd") == 1 and ops.count("fused_attention_grad") == 1
    assert not {"softmax", "softmax_grad", "dropout_mask", "batch_matmul"} & set(ops)
    fwd = next(n for n in fused.nodes if n.op == "fused_attention_fwd")
    bwd = next(n for n in fused.nodes if n.op == "fused_attention_grad")
    assert fwd.ann["fused_ops"] == ["batch_matmul", "mul", "add", "softmax", "dropout_mask", "mul", "batch_matmul"]
    assert fwd.name.startswith("Fused_Attention_") and bwd.name.startswith("Fused_AttentionGrad_")
    assert bwd.inputs[:5] == fwd.inputs and fwd.attrs["keep_prob"] == pytest.approx(0.8)
    assert fwd.inputs[4].op == "uniform"          # the dropout's draw, the same generator call
    saved_get = bwd.inputs[len(fwd.inputs) + 1]
    assert saved_get.op == "fused_get" and saved_get.inputs == [fwd] and fwd.attrs["store_p"] == (saved == "store_p")
    # dq, dk, dv go back through the head-merging transposes only: written merged, the transposes gone (the three
    # left split the heads of q, k, v in the forward); O is read by the loss as it is
    assert bwd.attrs["grads_bshd"] == (True, True, True) and not fwd.attrs["out_bshd"] and ops.count("transpose") == 3
    assert saved_get.shape == (next(n for n in g.nodes if n.op == "softmax").shape if saved == "store_p"
                               else fwd.inputs[0].shape[:-1])
    fused.verify()
    want = run_graph(g, feeds, False)
    g, feeds = _mha_graph(np.random.default_rng(0))      # a fresh graph: the dropout's generator starts again
    got = run_graph(g, feeds, True)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=2e-5, err_msg=key)


@pytest.mark.parametrize("case", ["query_mask", "probs_read_outside", "softmax_over_queries"])
def test_other_patterns_are_left_to_the_generic_fusion(case):
    rng = np.random.default_rng(1)
    kw = {"query_mask": dict(mask="queries"), "probs_read_outside": dict(tap="probs"),
          "softmax_over_queries": dict(axis=-2)}[case]
    g, feeds = _mha_graph(rng, **kw)
    assert "fused_attention_fwd" not in _ops(graph_kernel(dce(g)))
    want = run_graph(g, feeds, False)
    g, feeds = _mha_graph(np.random.default_rng(1), **kw)
    got = run_graph(g, feeds, True)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=2e-5, err_msg=key)


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(gemm_programs().filter(attention_fusable), st.booleans())
def test_random_attention_programs_fused_equals_unfused(spec, store_p):
    """test_fusion's batched-GEMM -> softmax -> GEMM programs restricted to the attention pattern (key masks
    trained or fed, dropout, scale, 3-d / split heads, q = k = v, values read again outside): the pass must
    take every one, and values, gradients and in-place updates equal the unfused graph."""
    limit = attention_pass.STORE_P_MAX_KEYS if store_p else 0      # P stored by the forward, or recomputed
    g, feeds, updated = build_gemm_program(spec)
    with _store_p_limit(limit):
        fused = graph_kernel(dce(g))
    assert _ops(fused).count("fused_attention_grad") == 1
    assert next(n for n in fused.nodes if n.op == "fused_attention_fwd").attrs["store_p"] == store_p
    with codegen.backend("interp"), _store_p_limit(limit):
        outs = []
        for fuse_it in (False, True):
            g, feeds, updated = build_gemm_program(spec)
            out = run_graph(g, feeds, fuse_it)
            out.update({f"var.{p.name}": p.data.copy() for p in updated})
            outs.append(out)
    want, got = outs
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=2e-5, err_msg=key)


# ---------------------------------------------------------------------------------------------------------
# BERT: losses and the profiler's view
# ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _store_p_limit(keys):
    old = attention_pass.STORE_P_MAX_KEYS
    attention_pass.STORE_P_MAX_KEYS = keys
    try:
        yield
    finally:
        attention_pass.STORE_P_MAX_KEYS = old


def test_bert_attention_is_fused_and_profiled(tmp_path):
    """BERT-small with attention dropout: every layer's attention is one forward and one backward task, and
    the profiler's op table shows them with their member ops."""
    import insight
    from insight import analysis

    make, batches = _bert(None)
    off, _, _ = train_losses(make, batches, False, 6)
    on, exe, _ = train_losses(make, batches, True, 6)
    np.testing.assert_allclose(on, off, rtol=1e-5, atol=1e-5)
    ops = _ops(exe.graph)
    assert ops.count("fused_attention_fwd") == 2 and ops.count("fused_attention_grad") == 2   # 2 layers
    for n in exe.graph.nodes:        # BERT merges the heads of O and of dq, dk, dv: the kernels write them merged
        if n.op == "fused_attention_fwd":
            assert n.attrs["out_bshd"] and n.attrs["store_p"]
        elif n.op == "fused_attention_grad":
            assert n.attrs["o_bshd"] and n.attrs["grads_bshd"] == (True, True, True)
    context.set_context(seed=0, enable_graph_kernel=True)
    try:
        net, loss, opt = make()
        model = Model(net, loss, opt, progress=False)
        model.train_step(*batches[0])
        with insight.Profiler(output_path=str(tmp_path / "run")):
            model.train_step(*batches[1])
    finally:
        context.set_context(enable_graph_kernel=False)
    table = analysis.op_stats(str(tmp_path / "run"), kinds=("kernel",))
    att = table[table["op"].isin(["fused_attention_fwd", "fused_attention_grad"])]
    assert len(att) == 4 and att["name"].str.startswith("Fused_Attention").all()
    assert att["fused_ops"].str.contains("softmax").all() and att["fused_ops"].str.contains("dropout_mask").any()
