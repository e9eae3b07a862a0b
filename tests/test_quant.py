"""Quantization-aware training end to end: fake quant, BN folding, the int8 engine, the int8 file, ONNX QDQ."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import runtime  # noqa: E402,F401
from runtime import Model, context, nn  # noqa: E402
from runtime import _kernels_quant as KQ  # noqa: E402
from runtime.core import Tensor  # noqa: E402
from runtime.examples.qat import LeNetBN, MLPBN, loss_fn, run  # noqa: E402
from runtime.ops import api as F  # noqa: E402
from runtime.ops.quant import fake_quant_perchannel, fake_quant_perlayer, quant_params, quantize_multiplier  # noqa: E402
from runtime.train.quant import (QuantConversionError, convert_quant_network, convert_to_int8, export_onnx,  # noqa: E402
                                 load_int8)

from gradcheck_util import check_gradients, eager_grads, graph_grads, numeric_grads, param, weights_for  # noqa: E402


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    """fp32 training, QAT fine-tuning and int8 conversion of LeNet-with-BN on the digits, once."""
    out = tmp_path_factory.mktemp("qat")
    r = run(epochs=10, qat_epochs=3, seed=1, output=str(out))
    print(f"LeNet-BN digits: fp32 {r['fp32_acc']:.4f}  QAT {r['qat_acc']:.4f}  int8 {r['int8_acc']:.4f}  "
          f"size {r['int8_bytes']}/{r['fp32_bytes']} B  batch-256 inference fp32 {r['fp32_ms']:.1f} ms, "
          f"int8 {r['int8_ms']:.1f} ms")
    yield r
    context.reset_context()


# ----------------------------------------------------------------------------------------------
# accuracy
# ----------------------------------------------------------------------------------------------
def test_lenet_qat_and_int8_accuracy_within_0_3_points_of_fp32(lenet):
    assert lenet["fp32_acc"] >= 0.97                      # a trained baseline, not chance
    assert lenet["qat_acc"] >= lenet["fp32_acc"] - 0.003
    assert lenet["int8_acc"] >= lenet["fp32_acc"] - 0.003


def test_mlp_qat_and_int8_accuracy_within_0_3_points_of_fp32(tmp_path):
    r = run(epochs=12, qat_epochs=3, lr=0.05, qat_lr=0.005, seed=2, output=str(tmp_path), net_factory=MLPBN,
            flatten=True)
    print(f"MLP digits: fp32 {r['fp32_acc']:.4f}  QAT {r['qat_acc']:.4f}  int8 {r['int8_acc']:.4f}  "
          f"size {r['int8_bytes']}/{r['fp32_bytes']} B")
    context.reset_context()
    assert r["fp32_acc"] >= 0.95
    assert r["qat_acc"] >= r["fp32_acc"] - 0.003
    assert r["int8_acc"] >= r["fp32_acc"] - 0.003
    # 64 inputs per unit: the int32 bias and float32 scale of each channel weigh 8 bytes next to 64 weight bytes
    assert r["int8_bytes"] <= 0.30 * r["fp32_bytes"]


# ----------------------------------------------------------------------------------------------
# the integer engine against the fake-quant simulation
# ----------------------------------------------------------------------------------------------
def _agreement(int8, sim_logits, x):
    q_sim = int8.to_quantized(sim_logits).astype(np.int32)
    q_int = int8.predict_quantized(x).astype(np.int32)
    d = np.abs(q_sim - q_int)
    return float((d == 0).mean()), int(d.max()), float((q_sim.argmax(1) == q_int.argmax(1)).mean())


def test_int8_engine_matches_the_fake_quant_simulation(lenet):
    xte, _ = lenet["test"]
    qat, qnet, int8 = lenet["qat_model"], lenet["qat_net"], lenet["int8_model"]
    # as converted: the only value the simulation keeps in float is each layer's bias
    same, worst, argmax = _agreement(int8, qat.predict(xte), xte)
    print(f"engine vs simulation (float biases): {100 * same:.2f}% identical, max {worst} LSB, argmax {argmax:.4f}")
    assert same >= 0.95 and worst <= 1 and argmax >= 0.995
    # with the biases snapped to their int32 grid the simulation models the deployed arithmetic
    snapped = convert_to_int8(qnet, xte.shape[1:], snap_biases=True)
    np.testing.assert_array_equal(snapped.arrays[snapped.ops[1]["arrays"]["w"]], int8.arrays[int8.ops[1]["arrays"]["w"]])
    qat._eval_graphs.clear()
    same, worst, _ = _agreement(snapped, qat.predict(xte), xte)
    print(f"engine vs simulation (snapped biases): {100 * same:.2f}% identical, max {worst} LSB")
    assert same >= 0.99
    assert worst <= 1


class ResTiny(nn.Cell):
    """A residual block (conv-BN-ReLU, conv-BN, TensorAdd, ReLU) for the add / relu int8 paths."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2dBnAct(1, 8, 3, has_bn=True, activation="relu")
        self.conv2 = nn.Conv2dBnAct(8, 8, 3, has_bn=True, activation="relu")
        self.conv3 = nn.Conv2dBnAct(8, 8, 3, has_bn=True)
        self.add = nn.TensorAdd()
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2, 2)
        self.flatten = nn.Flatten()
        self.fc = nn.DenseBnAct(8 * 4 * 4, 10)

    def construct(self, x):
        a = self.conv1(x)
        y = self.relu(self.add(a, self.conv3(self.conv2(a))))
        return self.fc(self.flatten(self.pool(y)))


@pytest.mark.parametrize("bn_fold, num_bits", [(True, (8, 8)), (True, (4, 8)), (False, (8, 8))],
                         ids=["folded", "folded_4bit_weights", "bn_kept_float"])
def test_residual_network_converts_to_int8_and_onnx(bn_fold, num_bits, tmp_path):
    """TensorAdd -> add_int8, a standalone ReLU -> relu_int8, 4-bit weights, and BN left in float during QAT
    (bn_fold=False: folded at conversion, so the engine's weights differ from the simulated ones)."""
    from runtime.dataset.digits import load_digits_split
    from runtime.examples.qat import accuracy, train

    context.set_context(mode=context.GRAPH_MODE, seed=4)
    try:
        xtr, ytr, xte, yte = load_digits_split(seed=0)
        net = ResTiny()
        train(net, xtr, ytr, 3, 0.05)
        qnet = convert_quant_network(net, bn_fold=bn_fold, freeze_bn=40, num_bits=num_bits)
        qat = train(qnet, xtr, ytr, 1, 0.005)
        int8 = convert_to_int8(qnet, (1, 8, 8), snap_biases=bn_fold)
        assert [o["op"] for o in int8.ops] == ["quantize", "conv", "conv", "conv", "add", "relu", "maxpool",
                                                "flatten", "dense", "dequantize"]
        qat._eval_graphs.clear()
        same, worst, argmax = _agreement(int8, qat.predict(xte), xte)
        print(f"residual bn_fold={bn_fold} bits={num_bits}: {100 * same:.2f}% identical, max {worst} LSB, "
              f"argmax {argmax:.4f}, accuracy QAT {accuracy(qat.predict, xte, yte):.4f} "
              f"int8 {accuracy(int8.predict, xte, yte):.4f}")
        if bn_fold:
            assert same >= 0.99 and worst <= 1
        else:
            assert argmax >= 0.97
        assert accuracy(int8.predict, xte, yte) >= 0.9
        ort = pytest.importorskip("onnxruntime")
        sess = ort.InferenceSession(export_onnx(int8, tmp_path / "res.onnx"), providers=["CPUExecutionProvider"])
        theirs, ours = sess.run(None, {"data": xte})[0], int8.predict(xte)
        assert (theirs.argmax(1) == ours.argmax(1)).mean() >= 0.995
        assert np.abs(theirs - ours).max() <= int8.output_quant[0] * 1.001
    finally:
        context.reset_context()


def test_int8_model_file_is_a_quarter_of_fp32_and_round_trips(lenet, tmp_path):
    assert lenet["int8_bytes"] <= 0.26 * lenet["fp32_bytes"], (lenet["int8_bytes"], lenet["fp32_bytes"])
    int8 = lenet["int8_model"]
    loaded = load_int8(lenet["int8_path"])
    xte, _ = lenet["test"]
    np.testing.assert_array_equal(loaded.predict_quantized(xte), int8.predict_quantized(xte))
    # every weight is int8, every bias int32: nothing float but the per-channel scales
    kinds = {k.split(".")[-1]: v.dtype for k, v in loaded.arrays.items()}
    assert kinds == {"w": np.int8, "bias": np.int32, "w_scale": np.float32}
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not an int8 model file"):
        load_int8(bad)
    trunc = tmp_path / "trunc.bin"
    trunc.write_bytes(Path(lenet["int8_path"]).read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        load_int8(trunc)


def test_int8_graph_runs_through_the_executor_and_only_int8_kernels_compute(lenet):
    int8 = lenet["int8_model"]
    exe = int8.compiled(7)
    ops = [n.op for n in exe.graph.nodes if n.op not in ("input", "param", "const")]
    assert ops[0] == "quantize" and ops[-1] == "dequantize"
    assert {"conv2d_int8", "dense_int8", "max_pool_int8"} <= set(ops)
    for n in exe.graph.nodes:
        if n.op in ("conv2d_int8", "dense_int8", "max_pool_int8"):
            assert n.dtype == np.int8 and all(i.dtype in (np.int8, np.int32) for i in n.inputs)


def test_onnx_qdq_export_agrees_with_onnxruntime(lenet, tmp_path):
    onnx = pytest.importorskip("onnx", reason="the [onnx] extra (pip install .[onnx]) is not installed")
    ort = pytest.importorskip("onnxruntime", reason="the [onnx] extra (pip install .[onnx]) is not installed")
    int8 = lenet["int8_model"]
    path = export_onnx(int8, tmp_path / "lenet_int8.onnx")
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    assert m.opset_import[0].version >= 13
    types = [n.op_type for n in m.graph.node]
    assert types.count("QuantizeLinear") >= 4 and "Conv" in types and "Gemm" in types
    w_dq = [n for n in m.graph.node if n.name.endswith("/DequantizeWeight")]
    inits = {i.name: i for i in m.graph.initializer}
    assert w_dq and all(inits[n.input[1]].dims[0] > 1 for n in w_dq)          # per-axis scales
    assert all(inits[n.input[0]].data_type == onnx.TensorProto.INT8 for n in w_dq)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    xte, _ = lenet["test"]
    ours = int8.predict(xte)
    theirs = sess.run(None, {"data": xte.astype(np.float32)})[0]
    scale, _ = int8.output_quant
    argmax = float((ours.argmax(1) == theirs.argmax(1)).mean())
    worst = float(np.abs(ours - theirs).max())
    print(f"onnxruntime vs int8 engine: argmax {argmax:.4f}, max diff {worst / scale:.2f} output steps")
    assert argmax >= 0.995
    assert worst <= scale * 1.001


# ----------------------------------------------------------------------------------------------
# gradients (float64)
# ----------------------------------------------------------------------------------------------
def _ste_case(per_channel, quant_delay=0, step=0):
    """x straddling the clamp range; returns (fq fn, clamp surrogate fn, params)."""
    rng = np.random.default_rng(3 + per_channel)
    x = param(rng.uniform(-1.5, 2.5, (3, 4, 5)))
    c = 4 if per_channel else 1
    mn = Tensor(np.full(c, -1.0) if not per_channel else np.array([-1.0, -0.5, -0.8, -1.2]))
    mx = Tensor(np.full(c, 1.5) if not per_channel else np.array([1.5, 1.0, 2.0, 0.7]))
    st = Tensor(np.asarray(step, np.int32))
    kw = dict(num_bits=8, quant_delay=quant_delay, training=True)

    def fq():
        if per_channel:
            return fake_quant_perchannel(x, mn, mx, st, channel_axis=1, **kw)
        return fake_quant_perlayer(x, mn, mx, st, **kw)

    _, nmin, nmax, _ = quant_params(mn.asnumpy(), mx.asnumpy(), 8, False, False, np.float64)
    shape = (1, c, 1) if per_channel else (1, 1, 1)
    lo, hi = Tensor(nmin.reshape(shape)), Tensor(nmax.reshape(shape))

    def clamp():  # the straight-through surrogate: identity inside [nmin, nmax], constant outside
        if quant_delay > step:
            return F.mul(x, 1.0)
        return F.minimum(F.maximum(x, lo), hi)
    return fq, clamp, [x]


@pytest.mark.parametrize("prim", ["fake_quant_perlayer", "fake_quant_perchannel"])
@pytest.mark.parametrize("delayed", [False, True], ids=["quantizing", "before_quant_delay"])
def test_ste_gradient_is_the_clamp_derivative(prim, delayed):
    """The fake quant's backward equals central differences of the clamp it straight-throughs: 1 inside the
    nudged range, 0 outside (and 1 everywhere before quant_delay) -- GRAPH and PYNATIVE."""
    fq, clamp, params = _ste_case(prim == "fake_quant_perchannel", quant_delay=5 if delayed else 0)
    r = weights_for(fq)
    _, g_graph = graph_grads(fq, params, r)
    _, g_eager = eager_grads(fq, params, r)
    g_num = numeric_grads(clamp, params, r)
    np.testing.assert_allclose(g_graph[0], g_eager[0], rtol=0, atol=0)
    np.testing.assert_allclose(g_graph[0], g_num[0], rtol=1e-6, atol=1e-8)
    mask = g_graph[0] / r
    assert set(np.unique(np.round(mask, 6))) == ({1.0} if delayed else {0.0, 1.0})


def test_a_fake_quant_applied_twice_in_a_step_masks_each_gradient_with_its_own_range():
    """One EMA FakeQuantWithMinMax on two tensors in one GRAPH step: the second use moves the range again, and
    the first use's straight-through gradient still masks with the range the first forward used."""
    fq = nn.FakeQuantWithMinMax(ema=True, ema_decay=0.5, min_init=-0.5, max_init=0.5, dtype=np.float64)
    fq.set_train(True)
    fq.step.set_data(np.asarray(1, np.int32))             # past the first step: the EMA blends
    x1 = param(np.linspace(-2.0, 2.0, 41).reshape(1, 41))
    x2 = param(np.linspace(-6.0, 6.0, 41).reshape(1, 41))
    fn = lambda: F.add(F.mul(fq(x1), 1.0), F.mul(fq(x2), 2.0))  # noqa: E731
    r = weights_for(fn)                                   # (runs fn once: put the state back)
    fq.minq.set_data(np.array([-0.5]))
    fq.maxq.set_data(np.array([0.5]))
    fq.step.set_data(np.asarray(1, np.int32))
    context.set_context(mode=context.GRAPH_MODE)
    try:
        _, (g1, g2) = graph_grads(fn, [x1, x2], r)
    finally:
        context.reset_context()
    ranges = []
    lo, hi = -0.5, 0.5
    for x in (x1.data, x2.data):                          # the EMA after each use
        lo, hi = 0.5 * lo + 0.5 * x.min(), 0.5 * hi + 0.5 * x.max()
        _, nmin, nmax, _ = quant_params(np.array([lo]), np.array([hi]), 8, False, False, np.float64)
        ranges.append((nmin[0], nmax[0]))
    for x, g, w, (nmin, nmax) in ((x1.data, g1, r, ranges[0]), (x2.data, g2, 2 * r, ranges[1])):
        mask = (x >= nmin) & (x <= nmax)
        assert 0 < mask.sum() < x.size                    # each range clips its own tensor
        np.testing.assert_allclose(g, np.where(mask, w, 0.0), rtol=0, atol=1e-12)
    np.testing.assert_allclose([fq.minq.data[0], fq.maxq.data[0]], [lo, hi])


def test_fake_quant_forward_levels_and_nudging():
    x = np.linspace(-3, 3, 1001).astype(np.float32)
    for bits in (4, 8):
        scale, nmin, nmax, zp = quant_params(np.array([-1.0]), np.array([2.0]), bits)
        y = KQ.fake_quant(x, np.array([-1.0]), np.array([2.0]), bits, False, False, x.size)
        assert len(np.unique(y)) == 2 ** bits                     # every level used, no more
        assert 0.0 in np.unique(y)                                 # real zero is exactly representable
        assert y.min() == nmin[0] and y.max() == nmax[0]
        np.testing.assert_allclose(np.diff(np.unique(y)), scale[0], rtol=1e-4)
    s, lo, hi, zp = quant_params(np.array([-0.3, -2.0]), np.array([0.5, 1.0]), 8, narrow_range=True, symmetric=True)
    assert list(zp) == [128, 128]                                  # signed zero point 0
    np.testing.assert_allclose(lo, -hi)                            # narrow range: [-127, 127] * s
    np.testing.assert_allclose(hi, [0.5, 2.0], rtol=1e-6)


@pytest.mark.parametrize("symmetric, narrow_range, bits", [(False, False, 8), (True, False, 8), (True, True, 8),
                                                         (False, True, 4)])
def test_fusible_expansion_of_fake_quant_is_bit_identical(symmetric, narrow_range, bits):
    """``EXPAND_RULES`` writes the fake quant and its STE with primitives graph-kernel fusion covers; they
    compute exactly what the kernels compute (forward and gradient, per tensor and per channel)."""
    from runtime.core import bind
    from runtime.ops import quant as Q

    rng = np.random.default_rng(bits + 2 * symmetric + narrow_range)
    x = Tensor((rng.standard_normal((8, 6, 5, 5)) * 3).astype(np.float32))
    g = Tensor(rng.standard_normal(x.shape).astype(np.float32))
    mn, mx = rng.uniform(-3, 0.5, 6).astype(np.float32), rng.uniform(-0.2, 4, 6).astype(np.float32)
    mn[2] = mx[2] = 0.0                                                  # an all-zero channel
    for step, delay in ((3, 0), (3, 5)):
        st = Tensor(np.asarray(step, np.int32))
        kw = dict(num_bits=bits, narrow_range=narrow_range, symmetric=symmetric, quant_delay=delay, training=True)
        for ins, attrs, prim in (([x, Tensor(mn), Tensor(mx), st], {**kw, "channel_axis": 1}, "fake_quant_perchannel"),
                                 ([x, Tensor(mn[:1]), Tensor(mx[:1]), st], kw, "fake_quant_perlayer")):
            np.testing.assert_array_equal(Q.EXPAND_RULES[prim](*ins, **attrs).asnumpy(), bind(prim, ins, attrs).asnumpy())
            np.testing.assert_array_equal(Q.EXPAND_RULES[prim + "_grad"](g, *ins, **attrs).asnumpy(),
                                          bind(prim + "_grad", [g] + ins, attrs).asnumpy())


def test_with_the_expansion_registered_fusion_fuses_fake_quant_with_its_neighbours(monkeypatch):
    """What wiring ``EXPAND_RULES`` into graph-kernel fusion gives: the observer, the nudge, the fake quant and
    the next add become one generated kernel with the primitive path's output, bit for bit."""
    import sys as _sys

    from runtime.core import GraphBuilder, building
    from runtime.executor import CompiledGraph
    from runtime.ir.graph import Graph
    from runtime.ops import quant as Q
    from runtime.passes import pipeline

    xv = (np.random.default_rng(0).standard_normal((64, 4096)) * 3).astype(np.float32)

    def build():
        g = Graph("fq")
        b = GraphBuilder(g)
        with building(b):
            y = F.mul(b.input("x", xv.shape, np.float32), 1.5)
            mn = F.reshape(F.neg(F.reduce_max(F.neg(y))), (1,))
            mx = F.reshape(F.reduce_max(y), (1,))
            q = fake_quant_perlayer(y, mn, mx, Tensor(np.asarray(0, np.int32)), training=False)
            g.outputs = {"out": F.add(q, 1.0).node}
        return g

    ref = CompiledGraph(pipeline(build()))({"x": xv})["out"]
    rules = _sys.modules["runtime.passes.graph_kernel.expand"].RULES
    for op, rule in Q.EXPAND_RULES.items():
        monkeypatch.setitem(rules, op, rule)
    context.set_context(enable_graph_kernel=True)
    try:
        fused = pipeline(build())
    finally:
        context.reset_context()
    kernels = [n for n in fused.nodes if n.op not in ("input", "const", "param")]
    assert [n.op for n in kernels] == ["fused"], [n.op for n in kernels]
    assert {"reduce_max", "minimum", "maximum", "div", "add"} <= set(kernels[0].ann["fused_ops"])
    np.testing.assert_array_equal(CompiledGraph(fused)({"x": xv})["out"], ref)


def _bn_fold_cell(freeze_bn):
    cell = nn.Conv2dBnFoldQuant(2, 3, 3, pad_mode="pad", padding=1, quant_delay=10 ** 6, freeze_bn=freeze_bn,
                                dtype=np.float64)
    rng = np.random.default_rng(11)
    cell.weight.set_data(rng.standard_normal(cell.weight.shape) * 0.5)
    cell.gamma.set_data(rng.uniform(0.5, 1.5, 3))
    cell.beta.set_data(rng.standard_normal(3) * 0.3)
    cell.moving_mean.set_data(rng.standard_normal(3) * 0.2)
    cell.moving_variance.set_data(rng.uniform(0.5, 2.0, 3))
    cell.set_train(True)
    return cell, param(rng.standard_normal((4, 2, 5, 5)))


@pytest.mark.parametrize("freeze_bn", [10 ** 6, 0], ids=["batch_stats_correction", "frozen_running_stats"])
def test_bn_fold_correction_gradients(freeze_bn):
    """Conv2dBnFoldQuant in training: with batch statistics the folded conv is corrected by
    sigma_running / sigma_batch and biased by beta - gamma mu_B / sigma_B (gradients flow through the batch
    statistics); frozen, it uses the running statistics. Checked against central differences in float64."""
    cell, x = _bn_fold_cell(freeze_bn)
    params = [x, cell.weight, cell.gamma, cell.beta]
    check_gradients(lambda: cell(x), params, ["x", "weight", "gamma", "beta"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("step, freeze_bn", [(0, 5), (5, 5)], ids=["batch_stats", "frozen_at_the_step"])
def test_bn_fold_correction_primitive_gradients(step, freeze_bn):
    """The ``bn_fold_correction`` primitive on its own, every input independent (float64 central differences):
    batch norm of y * k with gamma / beta before ``freeze_bn`` (d k in closed form), y + bias from that step on."""
    from runtime.ops.quant import bn_fold_correction

    rng = np.random.default_rng(5)
    y = param(rng.standard_normal((3, 4, 2, 5)) * 2 + 0.5)
    k, gamma = param(rng.uniform(0.4, 1.6, 4)), param(rng.uniform(-1.5, 1.5, 4))
    beta, bias = param(rng.standard_normal(4)), param(rng.standard_normal(4))
    st = Tensor(np.asarray(step, np.int32))
    fn = lambda: bn_fold_correction(y, k, gamma, beta, bias, st, eps=1e-3, freeze_bn=freeze_bn)  # noqa: E731
    grads = check_gradients(fn, [y, k, gamma, beta, bias], ["y", "k", "gamma", "beta", "bias"], rtol=1e-6, atol=1e-8)
    frozen = step >= freeze_bn
    for name, gr in zip(["k", "gamma", "beta", "bias"], grads[1:]):   # each branch feeds only its own inputs
        assert np.any(gr != 0) == ((name == "bias") == frozen), name


def test_observer_and_bn_fold_ops_name_bad_shapes():
    from runtime.ops.quant import bn_fold_correction, minmax_update
    from runtime.ops.registry import ShapeError

    st = Tensor(np.asarray(0, np.int32))
    y, v3 = Tensor(np.zeros((2, 3, 4, 4), np.float32)), Tensor(np.zeros(3, np.float32))
    with pytest.raises(ShapeError, match=r"bn_fold_correction: expects 4 per-channel vectors \(3,\)"):
        bn_fold_correction(y, Tensor(np.ones(4, np.float32)), v3, v3, v3, st)
    with pytest.raises(ShapeError, match=r"minmax_update_perchannel: the min variable must be float32 of shape \(3,\)"):
        minmax_update(y, Tensor(np.zeros(2, np.float32)), v3, st, channel_axis=1)
    with pytest.raises(ShapeError, match="minmax_update_perlayer: x .* is empty"):
        minmax_update(Tensor(np.zeros((0, 3), np.float32)), Tensor(np.zeros(1, np.float32)),
                      Tensor(np.zeros(1, np.float32)), st)


def test_bn_fold_matches_float_batchnorm_before_quantization():
    """Without fake quantization (before quant_delay in training; ``fake=False`` in evaluation, which always
    quantizes otherwise) the folded cell computes exactly conv + BatchNorm: batch statistics in training,
    running statistics in evaluation."""
    cell, x = _bn_fold_cell(10 ** 6)
    xv = x.data
    y0 = F.conv2d(Tensor(xv), Tensor(cell.weight.data), 1, 1).asnumpy()
    mean, var = y0.mean(axis=(0, 2, 3), keepdims=True), y0.var(axis=(0, 2, 3), keepdims=True)
    g, b = cell.gamma.data.reshape(1, -1, 1, 1), cell.beta.data.reshape(1, -1, 1, 1)
    mm, mv = cell.moving_mean.data.copy(), cell.moving_variance.data.copy()
    np.testing.assert_allclose(cell(Tensor(xv)).asnumpy(), (y0 - mean) / np.sqrt(var + 1e-5) * g + b, atol=1e-10)
    cell.set_train(False)
    cell.fake = False
    ref = (y0 - cell.moving_mean.data.reshape(1, -1, 1, 1)) / np.sqrt(cell.moving_variance.data.reshape(1, -1, 1, 1)
                                                                     + 1e-5) * g + b
    assert not np.allclose(cell.moving_mean.data, mm) and not np.allclose(cell.moving_variance.data, mv)
    np.testing.assert_allclose(cell(Tensor(xv)).asnumpy(), ref, atol=1e-10)


def test_bn_fold_with_a_zero_gamma_channel_stays_finite():
    context.set_context(mode=context.PYNATIVE_MODE)
    try:
        cell = nn.Conv2dBnFoldQuant(2, 3, 3)
        cell.set_train(True)
        cell.gamma.set_data(np.array([1.0, 0.0, 2.0], np.float32))
        cell.beta.set_data(np.array([0.1, 0.5, -0.2], np.float32))
        y = cell(Tensor(np.random.default_rng(0).standard_normal((4, 2, 5, 5)).astype(np.float32))).asnumpy()
        assert np.isfinite(y).all()
        np.testing.assert_array_equal(y[:, 1], 0.5)                      # gamma 0: the channel is beta
        assert np.isfinite(cell.moving_variance.data).all()
    finally:
        context.reset_context()


# ----------------------------------------------------------------------------------------------
# quant_delay and freeze_bn switch at the stated step
# ----------------------------------------------------------------------------------------------
def test_quant_delay_switches_at_the_stated_step():
    context.set_context(mode=context.PYNATIVE_MODE)
    try:
        fq = nn.FakeQuantWithMinMax(ema=True, quant_delay=3)
        fq.set_train(True)
        x = Tensor(np.linspace(-1, 1, 37, dtype=np.float32).reshape(1, 37))
        passthrough = []
        for _ in range(6):
            passthrough.append(bool(np.array_equal(fq(x).asnumpy(), x.asnumpy())))
        assert passthrough == [True, True, True, False, False, False]
        assert int(fq.step.data) == 6
    finally:
        context.reset_context()


def test_freeze_bn_switches_at_the_stated_step_in_a_training_graph():
    context.set_context(mode=context.GRAPH_MODE, seed=3)
    try:
        net = nn.SequentialCell([nn.Conv2dBnAct(1, 4, 3, has_bn=True, activation="relu"), nn.Flatten(),
                                 nn.DenseBnAct(4 * 8 * 8, 10)])
        qnet = convert_quant_network(net, freeze_bn=4, quant_delay=(2, 2))
        conv = qnet.network[0].conv
        assert isinstance(conv, nn.Conv2dBnFoldQuant) and conv.freeze_bn == 4
        model = Model(qnet, loss_fn(), nn.Momentum(qnet.trainable_params(), 0.01, 0.9), progress=False)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((16, 1, 8, 8)).astype(np.float32)
        y = rng.integers(0, 10, 16).astype(np.int32)
        changed = []
        for step in range(7):
            before = conv.moving_mean.data.copy()
            model.train_step(x, y)
            changed.append(not np.array_equal(before, conv.moving_mean.data))
            assert int(qnet.step.data) == step + 1              # one shared tick per training step
        assert changed == [True, True, True, True, False, False, False]
    finally:
        context.reset_context()


# ----------------------------------------------------------------------------------------------
# fixed-point arithmetic
# ----------------------------------------------------------------------------------------------
def test_requantization_multiplier_is_q31_and_rounds_half_up():
    rng = np.random.default_rng(5)
    for m in np.concatenate([rng.uniform(1e-5, 0.999, 200), [0.5, 0.75, 1.0, 3.7]]):
        mult, shift = quantize_multiplier(float(m))
        assert 2 ** 30 <= mult < 2 ** 31
        assert abs(mult * 2.0 ** (shift - 31) - m) <= m * 2.0 ** -30
        acc = rng.integers(-2 ** 20, 2 ** 20, 500).astype(np.int32)
        got = KQ.multiply_by_quantized_multiplier(acc, mult, shift)
        exact = np.array([(int(a) * mult + (1 << (30 - shift))) >> (31 - shift) for a in acc])   # Python ints
        np.testing.assert_array_equal(got, exact)
        np.testing.assert_allclose(got, np.floor(acc * (mult * 2.0 ** (shift - 31)) + 0.5), atol=1)


def _requant_ref(acc, mult, shift, zp):
    return np.array([zp + ((int(a) * int(m) + (1 << (30 - int(s)))) >> (31 - int(s)))
                     for a, m, s in zip(acc, mult, shift)])


@pytest.mark.parametrize("c, o", [(2, 4), (3, 20), (5, 40)], ids=["K18_O4", "K27odd_O20", "K45odd_O40"])
def test_int8_kernels_against_integer_reference(c, o):
    """conv2d_int8 / dense_int8 against Python-integer arithmetic, for odd K (a half-filled int16 pair) and
    channel counts that are not multiples of the 16-channel blocks."""
    rng = np.random.default_rng(8 + c)
    x = rng.integers(-128, 128, (3, c, 6, 5)).astype(np.int8)
    w = rng.integers(-127, 128, (o, c * 3 * 3)).astype(np.int8)
    bias = rng.integers(-5000, 5000, o).astype(np.int32)
    ms = [quantize_multiplier(float(m)) for m in rng.uniform(0.002, 0.6, o)]
    mult, shift = np.array([m for m, _ in ms], np.int32), np.array([s for _, s in ms], np.int32)
    zp_x, zp_y = 5, -3
    out = KQ.conv2d_int8(x, w, bias, mult, shift, 3, 3, 1, 1, 1, 1, zp_x, zp_y, -128, 127)
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=zp_x)
    ref = np.zeros(out.shape, np.int64)
    for n in range(3):
        for i in range(6):
            for j in range(5):
                acc = w.astype(np.int64) @ xp[n, :, i:i + 3, j:j + 3].reshape(-1) + bias
                ref[n, :, i, j] = _requant_ref(acc, mult, shift, zp_y)
    np.testing.assert_array_equal(out, np.clip(ref, -128, 127))
    xd = rng.integers(-128, 128, (37, c * 9)).astype(np.int8)
    dense = KQ.dense_int8(xd, w, bias, mult, shift, 7, -100, 120)
    ref = np.stack([_requant_ref(w.astype(np.int64) @ row.astype(np.int64) + bias, mult, shift, 7) for row in xd])
    np.testing.assert_array_equal(dense, np.clip(ref, -100, 120))
    pooled = KQ.maxpool_int8(x, 2, 2, 2, 2)
    np.testing.assert_array_equal(pooled, x[:, :, :6, :4].reshape(3, c, 3, 2, 2, 2).max(axis=(3, 5)))
    np.testing.assert_array_equal(KQ.relu_int8(x, -7, 100), np.clip(x, -7, 100))


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
def test_conversion_errors_name_the_cell():
    with pytest.raises(QuantConversionError, match="no Conv2dBnAct / DenseBnAct"):
        convert_quant_network(nn.SequentialCell([nn.Dense(4, 3)]))
    net = nn.SequentialCell([nn.DenseBnAct(4, 3, activation="relu"), nn.Dense(3, 2)])
    qnet = convert_quant_network(net)
    with pytest.raises(QuantConversionError, match=r"Dense\(in_channels=3, out_channels=2\) at .*no int8 lowering"):
        convert_to_int8(qnet, (4,))
    pooled = convert_quant_network(nn.SequentialCell([nn.Conv2dBnAct(1, 2, 3), nn.AvgPool2d(2, 2)]))
    with pytest.raises(QuantConversionError, match=r"AvgPool2d.* at 'QuantNetwork/network/1'.*no int8 lowering"):
        convert_to_int8(pooled, (1, 4, 4))
    with pytest.raises(QuantConversionError, match="expects the QuantNetwork"):
        convert_to_int8(net, (4,))
    conv = convert_quant_network(LeNetBN())
    with pytest.raises(QuantConversionError, match=r"Conv2dBnFoldQuant.* at 'QuantNetwork/network/conv1/conv'.*"
                                                   r"expects \(N, C, H, W\) input, got \(N, 64\)"):
        convert_to_int8(conv, (64,))
    with pytest.raises(TypeError, match="expects an Int8Model"):
        export_onnx(conv, "unused.onnx")


# ----------------------------------------------------------------------------------------------
# profiling: the op table shows the fake-quant ops (fused or not) and the int8 kernels
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("graph_kernel", [False, True], ids=["unfused", "graph_kernel"])
def test_profiled_qat_run_lists_the_fake_quant_ops(tmp_path, graph_kernel):
    import insight
    from insight.analysis import op_stats
    from runtime.dataset.digits import load_digits_split

    context.set_context(mode=context.GRAPH_MODE, seed=1, enable_graph_kernel=graph_kernel)
    try:
        xtr, ytr, _, _ = load_digits_split(seed=0)
        qnet = convert_quant_network(LeNetBN())
        model = Model(qnet, loss_fn(), nn.Momentum(qnet.trainable_params(), 0.01, 0.9), progress=False)
        with insight.Profiler(output_path=str(tmp_path / "qat")):
            for i in range(3):
                model.train_step(xtr[32 * i:32 * i + 32], ytr[32 * i:32 * i + 32])
        table = op_stats(tmp_path / "qat")
        members = set(table["op"]) | {m for f in table["fused_ops"] for m in str(f).split(",") if m}
        for op in ("fake_quant_perlayer", "fake_quant_perchannel", "fake_quant_perlayer_grad",
                   "fake_quant_perchannel_grad"):
            assert op in members, f"{op} missing from the op table: {sorted(members)}"
        if graph_kernel:
            assert table["fused_ops"].astype(str).str.len().gt(0).any()     # fused groups name their members
    finally:
        context.reset_context()


def test_profiled_int8_inference_shows_its_kernels(lenet, tmp_path):
    import insight
    from insight.analysis import op_stats

    xte, _ = lenet["test"]
    with insight.Profiler(output_path=str(tmp_path / "int8")):
        lenet["int8_model"].predict(xte[:64])
    ops = set(op_stats(tmp_path / "int8")["op"])
    assert {"quantize", "conv2d_int8", "max_pool_int8", "dense_int8", "dequantize"} <= ops
