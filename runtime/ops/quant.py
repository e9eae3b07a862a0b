"""Quantization primitives: fake quantization for training and the int8 inference kernels.

Fake quantization (MindSpore 0.5's FakeQuantPerLayer / FakeQuantPerChannel, TensorFlow's nudged scheme):

* ``fake_quant_perlayer(x, min, max, step)`` / ``fake_quant_perchannel(x, min, max, step)``: ``min`` / ``max``
  are the observed range ((1,) per tensor, (C,) per channel along ``channel_axis``); the range is widened
  to contain 0, made symmetric when ``symmetric``, and *nudged* so that real 0 is exactly representable
  (``quant_params``). ``out = (floor((clamp(x) - nmin) / scale + 0.5) + qmin - zero_point) * scale`` (an
  integer times the scale: real 0 stays exactly 0).
  While ``training`` and ``step < quant_delay`` the op is the identity (quantization has not started).
* backward: the straight-through estimator -- ``g`` where ``nmin <= x <= nmax``, 0 outside
  (``fake_quant_perlayer_grad`` / ``fake_quant_perchannel_grad``); ``min``, ``max`` and ``step`` get none.
  Before ``quant_delay`` the gradient passes unmasked.
* fusion category ``elementwise``; kernels in ``runtime/_kernels_quant.pyx``.
* ``bn_fold_correction(y, k, gamma, beta, bias, step)``: the BN-fold correction of ``Conv2dBnFoldQuant`` in
  training (batch norm of the unfolded conv y * k until ``freeze_bn``, then y + bias), with its two backward
  ops ``bn_fold_correction_grad_params`` / ``_grad_input``; ``opaque``.
* the observer ``minmax_update_perlayer`` / ``minmax_update_perchannel(x, minq, maxq, step)`` (MindSpore's
  MinMaxUpdatePerLayer / PerChannel): one task, one sweep over ``x`` for its min and max, returned as the new
  (2C,) range (the moving average of the variables' with ``ema``); ``opaque``. In training a
  ``FakeQuantWithMinMax`` is the observer, the two halves assigned to ``minq`` / ``maxq``, the fake quant.

The int8 engine (``*_int8``, ``quantize``, ``dequantize``) runs a converted model on integers only:
int8 activations and weights, int32 accumulation, requantization by a Q31 multiplier and a shift
(``quantize_multiplier``). They are ``opaque`` primitives without backward rules, so an int8 model is an
ordinary graph that the executor runs and the profiler records.
"""
from __future__ import annotations

import math

import numpy as np

from runtime import _kernels_quant as KQ
from runtime.core import Tensor, as_tensor, bind
from runtime.ops import api as F
from runtime.ops.registry import Primitive, ShapeError, register

F32 = np.float32


# ----------------------------------------------------------------------------------------------
# quantization parameters
# ----------------------------------------------------------------------------------------------
def quant_range(num_bits: int, narrow_range: bool) -> tuple[int, int]:
    """(qmin, qmax) of the unsigned representation: [0 or 1, 2^bits - 1]."""
    return (1 if narrow_range else 0), (1 << int(num_bits)) - 1


def quant_params(mn, mx, num_bits=8, narrow_range=False, symmetric=False, dtype=F32):
    """Nudged quantization parameters per channel, computed in ``dtype`` exactly as the kernels use them
    (one implementation, in ``runtime/_kernels_quant.pyx``).

    The range is widened to contain 0 (and made symmetric when ``symmetric``); the zero point is rounded
    so that real 0 is a level. Returns (scale, nmin, nmax, zero_point): ``zero_point`` in the unsigned
    domain [qmin, qmax]; the signed int8 value of ``q`` is ``q - 2^(bits-1)``, and symmetric ranges have
    zero point 2^(bits-1) (signed 0)."""
    scale, nmin, nmax, _, zp = KQ.quant_params(mn, mx, int(num_bits), bool(narrow_range), bool(symmetric), dtype)
    return scale, nmin, nmax, zp


def quantize_multiplier(m: float) -> tuple[int, int]:
    """Real multiplier -> (Q31 multiplier in [2^30, 2^31), shift) with m = mult * 2^(shift - 31)."""
    if not m > 0 or not math.isfinite(m):
        if m == 0:
            return 0, 0
        raise ValueError(f"quantize_multiplier: the multiplier must be positive and finite, got {m}")
    mant, exp = math.frexp(m)            # m = mant * 2^exp, mant in [0.5, 1)
    q = int(round(mant * (1 << 31)))
    if q == (1 << 31):
        q //= 2
        exp += 1
    if exp < -31:                         # below int32 resolution: the product rounds to 0
        return 0, 0
    if exp > 30:
        raise ValueError(f"quantize_multiplier: multiplier {m} is too large for int32 requantization")
    return q, exp


# ----------------------------------------------------------------------------------------------
# fake quantization
# ----------------------------------------------------------------------------------------------
def _layout(shape, axis):
    if axis is None:
        return math.prod(shape) or 1
    return math.prod(shape[axis + 1:])


def _range_shape(name, xs, per_channel, attrs):
    """The shape of the (min, max) range vectors of ``x``: (C,) along ``channel_axis``, or (1,)."""
    if not per_channel:
        return (1,)
    ax = attrs["channel_axis"]
    if not 0 <= ax < len(xs):
        raise ShapeError(f"{name}: channel_axis {ax} is out of range for x {xs}")
    return (xs[ax],)


def _fq_infer(name, per_channel):
    def infer(shapes, dtypes, attrs):
        xs = tuple(shapes[0])
        if np.dtype(dtypes[0]).kind != "f":
            raise ShapeError(f"{name}: expects a floating-point tensor, got {np.dtype(dtypes[0])}")
        nbits = attrs["num_bits"]
        if not 2 <= int(nbits) <= 8:
            raise ShapeError(f"{name}: num_bits must be in 2..8, got {nbits}")
        k = 1 if name.endswith("_grad") else 0          # the grad ops take (g, x, min, max, step)
        if k and tuple(shapes[1]) != xs:
            raise ShapeError(f"{name}: g {xs} and x {tuple(shapes[1])} differ")
        want = _range_shape(name, xs, per_channel, attrs)
        for what, s, d in (("min", shapes[1 + k], dtypes[1 + k]), ("max", shapes[2 + k], dtypes[2 + k])):
            if tuple(s) != want or np.dtype(d).kind != "f":
                raise ShapeError(f"{name}: {what} must be a float tensor of shape {want} for x {xs}, "
                                 f"got {tuple(s)} {np.dtype(d)}")
        if tuple(shapes[3 + k]) != () or np.dtype(dtypes[3 + k]).kind not in "iu":
            raise ShapeError(f"{name}: step must be an integer scalar, got {tuple(shapes[3 + k])} "
                             f"{np.dtype(dtypes[3 + k])}")
        return xs, dtypes[0]
    return infer


def _quantizing(step, quant_delay, training) -> bool:
    return (not training) or quant_delay <= 0 or int(step) >= quant_delay


def _fq_kernel(per_channel):
    def kernel(x, mn, mx, step, num_bits, narrow_range, symmetric, quant_delay, training, channel_axis=None):
        if not _quantizing(step, quant_delay, training):
            return np.array(x, copy=True)
        return KQ.fake_quant(x, mn, mx, num_bits, narrow_range, symmetric,
                             _layout(x.shape, channel_axis if per_channel else None))
    return kernel


def _fq_grad_kernel(per_channel):
    def kernel(g, x, mn, mx, step, num_bits, narrow_range, symmetric, quant_delay, training, channel_axis=None):
        if not _quantizing(step, quant_delay, training):
            return np.array(g, copy=True)
        return KQ.fake_quant_grad(g, x, mn, mx, num_bits, narrow_range, symmetric,
                                  _layout(x.shape, channel_axis if per_channel else None))
    return kernel


def _fq_grad_rule(grad_name):
    def rule(g, y, x, mn, mx, step, **attrs):
        return [bind(grad_name, [g, x, mn, mx, step], attrs), None, None, None]
    return rule


for _name, _pc, _ms in (("fake_quant_perlayer", False, "FakeQuantPerLayer"),
                        ("fake_quant_perchannel", True, "FakeQuantPerChannel")):
    register(Primitive(_name, "elementwise", _fq_infer(_name, _pc), _fq_kernel(_pc), _fq_grad_rule(_name + "_grad"),
                       flops_per_element=6, differentiable_inputs=(0,),
                       attrs_doc="num_bits, narrow_range, symmetric, quant_delay, training[, channel_axis]",
                       extra={"mindspore_name": _ms, "gradcheck": "tests/test_quant.py"}))
    register(Primitive(_name + "_grad", "elementwise", _fq_infer(_name + "_grad", _pc), _fq_grad_kernel(_pc),
                       flops_per_element=2, attrs_doc="as the forward op",
                       extra={"mindspore_name": _ms + "Grad"}))


# ----------------------------------------------------------------------------------------------
# the observer: min and max (or their moving average) of a tensor in one sweep
# ----------------------------------------------------------------------------------------------
def _observe_infer(name, per_channel):
    def infer(shapes, dtypes, attrs):
        xs, xd = tuple(shapes[0]), np.dtype(dtypes[0])
        if xd.kind != "f":
            raise ShapeError(f"{name}: expects a floating-point tensor, got {xd}")
        want = _range_shape(name, xs, per_channel, attrs)
        if math.prod(xs) == 0:
            raise ShapeError(f"{name}: x {xs} is empty and has no range to observe")
        for what, s, d in (("min", shapes[1], dtypes[1]), ("max", shapes[2], dtypes[2])):
            if tuple(s) != want or np.dtype(d) != xd:
                raise ShapeError(f"{name}: the {what} variable must be {xd} of shape {want} for x {xs}, "
                                 f"got {tuple(s)} {np.dtype(d)}")
        if tuple(shapes[3]) != () or np.dtype(dtypes[3]).kind not in "iu":
            raise ShapeError(f"{name}: step must be an integer scalar, got {tuple(shapes[3])} {np.dtype(dtypes[3])}")
        return (2 * want[0],), xd
    return infer


def _observe_kernel(per_channel):
    def kernel(x, minq, maxq, step, ema, ema_decay, channel_axis=None):
        return KQ.observe_minmax(x, minq, maxq, _layout(x.shape, channel_axis if per_channel else None),
                                 bool(ema) and int(step) != 0, ema_decay)
    return kernel


for _name, _pc, _ms in (("minmax_update_perlayer", False, "MinMaxUpdatePerLayer"),
                        ("minmax_update_perchannel", True, "MinMaxUpdatePerChannel")):
    register(Primitive(_name, "opaque", _observe_infer(_name, _pc), _observe_kernel(_pc),
                       cost_fn=lambda n: (2 * n.inputs[0].size, n.inputs[0].nbytes + 3 * n.nbytes),
                       attrs_doc="ema, ema_decay[, channel_axis]",
                       extra={"mindspore_name": _ms}))


def minmax_update(x, minq, maxq, step, ema=True, ema_decay=0.999, channel_axis=None):
    """The observer of a fake quant, one task (MindSpore's MinMaxUpdatePerLayer / PerChannel): the min and
    max of ``x`` (per tensor, or per channel along ``channel_axis``) found in one sweep; returns the new range
    as one (2C,) tensor [min..., max...] -- with ``ema``, from the second step on (``step != 0``), the moving
    average ``var * ema_decay + observed * (1 - ema_decay)`` of the current ``minq`` / ``maxq``. A pure
    function: the caller assigns the two halves to the variables and hands them to the fake quant (so a
    backward that runs after a later update of the variables still sees the range this step used)."""
    attrs = {"ema": bool(ema), "ema_decay": float(ema_decay)}
    if channel_axis is None:
        return bind("minmax_update_perlayer", [_t(x), _t(minq), _t(maxq), _t(step)], attrs)
    attrs["channel_axis"] = int(channel_axis)
    return bind("minmax_update_perchannel", [_t(x), _t(minq), _t(maxq), _t(step)], attrs)


def _fq_attrs(num_bits, narrow_range, symmetric, quant_delay, training):
    return {"num_bits": int(num_bits), "narrow_range": bool(narrow_range), "symmetric": bool(symmetric),
            "quant_delay": int(quant_delay), "training": bool(training)}


def _t(x, like=None):
    return x if isinstance(x, Tensor) else as_tensor(x, like)


def fake_quant_perlayer(x, mn, mx, step, num_bits=8, narrow_range=False, symmetric=False, quant_delay=0,
                        training=True):
    """Fake-quantize a whole tensor with one (min, max) range of shape (1,)."""
    return bind("fake_quant_perlayer", [_t(x), _t(mn), _t(mx), _t(step)],
                _fq_attrs(num_bits, narrow_range, symmetric, quant_delay, training))


def fake_quant_perchannel(x, mn, mx, step, channel_axis=0, num_bits=8, narrow_range=False, symmetric=False,
                          quant_delay=0, training=True):
    """Fake-quantize each slice along ``channel_axis`` with its own (min, max) (shapes (C,))."""
    attrs = _fq_attrs(num_bits, narrow_range, symmetric, quant_delay, training)
    attrs["channel_axis"] = int(channel_axis)
    return bind("fake_quant_perchannel", [_t(x), _t(mn), _t(mx), _t(step)], attrs)


# ----------------------------------------------------------------------------------------------
# fake quantization in fusible primitives (for graph-kernel fusion's expand pass)
# ----------------------------------------------------------------------------------------------
_MAGIC = float(np.float32(1.5 * 2 ** 23))


def _floor_small(u):
    """floor(u) for 0 <= u < 2^22 from float32 add / sub / compare / cast: adding and subtracting 1.5 * 2^23
    rounds to the nearest integer (exact in float32, no fast-math), then one step down where that rounded up."""
    r = F.sub(F.add(u, _MAGIC), _MAGIC)
    return F.sub(r, F.cast(F.greater(r, u), u.dtype))


def _nudged(mn, mx, num_bits, narrow_range, symmetric):
    """(scale, nmin, nmax, zlo) per channel with the operations, in the order, of the kernels' ``_nudge``."""
    qmin, qmax = quant_range(num_bits, narrow_range)
    mn, mx = F.minimum(mn, 0.0), F.maximum(mx, 0.0)
    if symmetric:
        a = F.maximum(F.neg(mn), mx)
        mn, mx = F.neg(a), a
    s = F.div(F.sub(mx, mn), float(qmax - qmin))
    s = F.select(F.greater(s, 0.0), s, 1.0)
    if symmetric:
        z = Tensor(np.full(tuple(s.shape), (qmax + 1) // 2, np.dtype(s.dtype)))
    else:
        zf = F.minimum(F.maximum(F.sub(float(qmin), F.div(mn, s)), float(qmin)), float(qmax))
        z = _floor_small(F.add(zf, 0.5))
    return s, F.mul(F.sub(float(qmin), z), s), F.mul(F.sub(float(qmax), z), s), F.sub(float(qmin), z)


def _expand_parts(x, mn, mx, num_bits, narrow_range, symmetric, channel_axis):
    s, lo, hi, zlo = _nudged(mn, mx, num_bits, narrow_range, symmetric)
    if channel_axis is not None:
        shape = tuple(x.shape[channel_axis] if i == channel_axis else 1 for i in range(x.ndim))
        s, lo, hi, zlo = (F.reshape(v, shape) for v in (s, lo, hi, zlo))
    return s, lo, hi, zlo


def _gated(step, quant_delay, training, quantized, passthrough):
    if not training or quant_delay <= 0:
        return quantized
    return F.select(F.greater_equal(step, int(quant_delay)), quantized, passthrough)


def expand_fake_quant(x, mn, mx, step, num_bits, narrow_range, symmetric, quant_delay, training, channel_axis=None):
    """``fake_quant_*`` written with elementwise primitives graph-kernel fusion can fuse (clamp, sub, div, add,
    compare, cast, select, mul): bit-identical to the kernel, float32 only."""
    s, lo, hi, zlo = _expand_parts(x, mn, mx, num_bits, narrow_range, symmetric, channel_axis)
    v = F.minimum(F.maximum(x, lo), hi)
    t = F.add(F.div(F.sub(v, lo), s), 0.5)
    return _gated(step, quant_delay, training, F.mul(F.add(_floor_small(t), zlo), s), x)


def expand_fake_quant_grad(g, x, mn, mx, step, num_bits, narrow_range, symmetric, quant_delay, training,
                           channel_axis=None):
    """The straight-through estimator of ``expand_fake_quant``: g inside [nmin, nmax], 0 outside."""
    _, lo, hi, _ = _expand_parts(x, mn, mx, num_bits, narrow_range, symmetric, channel_axis)
    zero = F.zeros_like(g)
    masked = F.select(F.greater_equal(x, lo), F.select(F.less_equal(x, hi), g, zero), zero)
    return _gated(step, quant_delay, training, masked, g)


# graph-kernel fusion's expand pass can take these as rules (op -> rule(*inputs, **attrs)):
#   runtime.passes.graph_kernel.expand.RULES.update(runtime.ops.quant.EXPAND_RULES)
EXPAND_RULES = {
    "fake_quant_perlayer": expand_fake_quant,
    "fake_quant_perchannel": expand_fake_quant,
    "fake_quant_perlayer_grad": expand_fake_quant_grad,
    "fake_quant_perchannel_grad": expand_fake_quant_grad,
}


# ----------------------------------------------------------------------------------------------
# the BN-fold correction (Conv2dBnFoldQuant in training)
# ----------------------------------------------------------------------------------------------
def _bnf_infer(name, n_vec, n_full, out_rows=None):
    """Inputs: ``n_full`` tensors of y's shape (N, C, ...) first, then ``n_vec`` (C,) vectors, an optional
    (6, C) ``P`` (the input-gradient op) and the int step scalar last."""
    def infer(shapes, dtypes, attrs):
        ys, yd = tuple(shapes[n_full - 1]), np.dtype(dtypes[n_full - 1])
        if len(ys) < 2 or yd.kind != "f":
            raise ShapeError(f"{name}: expects a float (N, C, ...) tensor, got {ys} {yd}")
        c = ys[1]
        for i in range(n_full):
            if tuple(shapes[i]) != ys or np.dtype(dtypes[i]) != yd:
                raise ShapeError(f"{name}: input {i} {tuple(shapes[i])} {np.dtype(dtypes[i])} does not match "
                                 f"y {ys} {yd}")
        rest = [(tuple(shapes[i]), np.dtype(dtypes[i])) for i in range(n_full, len(shapes) - 1)]
        want = [(c,)] * n_vec + ([(6, c)] if len(rest) > n_vec else [])
        if [r[0] for r in rest] != want or any(d != yd for _, d in rest):
            raise ShapeError(f"{name}: expects {n_vec} per-channel vectors ({c},) of {yd} for y {ys}, "
                             f"got {[r[0] for r in rest]}")
        if tuple(shapes[-1]) != () or np.dtype(dtypes[-1]).kind not in "iu":
            raise ShapeError(f"{name}: step must be an integer scalar, got {tuple(shapes[-1])} {np.dtype(dtypes[-1])}")
        return ((out_rows, c) if out_rows else ys), yd
    return infer


def _frozen(step, freeze_bn) -> bool:
    return int(step) >= int(freeze_bn)


def _bnf_grad(g, out, y, k, gamma, beta, bias, step, eps, freeze_bn):
    attrs = {"eps": eps, "freeze_bn": freeze_bn}
    p = bind("bn_fold_correction_grad_params", [g, y, k, gamma, step], attrs)
    dy = bind("bn_fold_correction_grad_input", [g, y, k, gamma, p, step], attrs)
    c = k.shape[0]

    def row(i):
        return F.reshape(F.slice(p, (i, 0), (i + 1, c)), (c,))
    return [dy, row(2), row(0), row(1), row(3), None]


register(Primitive("bn_fold_correction", "opaque", _bnf_infer("bn_fold_correction", 4, 1),
                   lambda y, k, gamma, beta, bias, step, eps, freeze_bn: KQ.bn_fold_forward(
                       y, k, gamma, beta, bias, _frozen(step, freeze_bn), eps),
                   _bnf_grad, differentiable_inputs=(0, 1, 2, 3, 4),
                   cost_fn=lambda n: (8 * n.size, 3 * n.nbytes),
                   attrs_doc="eps, freeze_bn",
                   extra={"mindspore_name": "BatchNormFold2", "gradcheck": "tests/test_quant.py"}))
register(Primitive("bn_fold_correction_grad_params", "opaque",
                   _bnf_infer("bn_fold_correction_grad_params", 2, 2, out_rows=6),
                   lambda g, y, k, gamma, step, eps, freeze_bn: KQ.bn_fold_backward_params(
                       g, y, k, gamma, _frozen(step, freeze_bn), eps),
                   cost_fn=lambda n: (6 * n.inputs[1].size, 3 * n.inputs[1].nbytes), attrs_doc="eps, freeze_bn",
                   extra={"mindspore_name": "BatchNormFold2GradReduce"}))
register(Primitive("bn_fold_correction_grad_input", "opaque", _bnf_infer("bn_fold_correction_grad_input", 2, 2),
                   lambda g, y, k, gamma, p, step, eps, freeze_bn: KQ.bn_fold_backward_input(
                       g, y, k, gamma, p, _frozen(step, freeze_bn), eps),
                   cost_fn=lambda n: (6 * n.size, 3 * n.nbytes), attrs_doc="eps, freeze_bn",
                   extra={"mindspore_name": "BatchNormFold2Grad"}))


def bn_fold_correction(y, k, gamma, beta, bias, step, eps=1e-5, freeze_bn=10 ** 9):
    """The training output of a BN-folded conv ``y`` (N, C, ...) (Jacob et al. 2018): batch norm of the
    unfolded conv z = y * k (``k`` = sigma_running / gamma per channel) -- that is y corrected by
    sigma_running / sigma_batch plus ``beta - gamma mu_batch / sigma_batch``, gradients through the batch
    statistics -- while ``step < freeze_bn``; from then on ``y + bias`` (``bias`` = beta - gamma mu_running /
    sigma_running). One kernel forward, two backward (per-channel sums, then d y)."""
    return bind("bn_fold_correction", [_t(y), _t(k), _t(gamma), _t(beta), _t(bias), _t(step)],
                {"eps": float(eps), "freeze_bn": int(freeze_bn)})


# ----------------------------------------------------------------------------------------------
# the int8 engine
# ----------------------------------------------------------------------------------------------
def _need(name, cond, msg):
    if not cond:
        raise ShapeError(f"{name}: {msg}")


def _int8_in(name, shapes, dtypes, k, ndim=None):
    _need(name, np.dtype(dtypes[k]) == np.int8, f"input {k} must be int8, got {np.dtype(dtypes[k])}")
    if ndim is not None:
        _need(name, len(shapes[k]) == ndim, f"input {k} must be {ndim}-d, got {tuple(shapes[k])}")


def _channel_vectors(name, shapes, dtypes, first, o):
    for k, what in zip(range(first, first + 3), ("bias", "multiplier", "shift")):
        _need(name, tuple(shapes[k]) == (o,) and np.dtype(dtypes[k]) == np.int32,
              f"{what} must be int32 of shape ({o},), got {tuple(shapes[k])} {np.dtype(dtypes[k])}")


def _quantize_infer(shapes, dtypes, attrs):
    _need("quantize", np.dtype(dtypes[0]) == np.float32, f"expects float32 input, got {np.dtype(dtypes[0])}")
    return shapes[0], np.dtype(np.int8)


register(Primitive("quantize", "elementwise", _quantize_infer,
                   lambda x, scale, nmin, nmax, qmin: KQ.quantize(x, scale, nmin, nmax, qmin),
                   flops_per_element=4, attrs_doc="scale, nmin, nmax, qmin", extra={"mindspore_name": "Quant"}))


def _dequantize_infer(shapes, dtypes, attrs):
    _int8_in("dequantize", shapes, dtypes, 0)
    return shapes[0], np.dtype(np.float32)


register(Primitive("dequantize", "elementwise", _dequantize_infer,
                   lambda q, scale, zero_point: KQ.dequantize(q, scale, zero_point),
                   flops_per_element=2, attrs_doc="scale, zero_point", extra={"mindspore_name": "Dequant"}))


def _conv_int8_infer(shapes, dtypes, attrs):
    name = "conv2d_int8"
    _int8_in(name, shapes, dtypes, 0, 4)
    _int8_in(name, shapes, dtypes, 1, 2)
    n, c, h, w = shapes[0]
    o, k = shapes[1]
    kh, kw = attrs["kernel"]
    (sh, sw), (ph, pw) = attrs["stride"], attrs["padding"]
    _need(name, k == c * kh * kw, f"weight {tuple(shapes[1])} does not fit {c} input channels and a "
                                  f"{kh}x{kw} kernel (x {tuple(shapes[0])})")
    _channel_vectors(name, shapes, dtypes, 2, o)
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    _need(name, oh > 0 and ow > 0, f"a {kh}x{kw} kernel does not fit {h}x{w} with padding ({ph}, {pw})")
    return (n, o, oh, ow), np.dtype(np.int8)


def _conv_int8_kernel(x, w, bias, mult, shift, kernel, stride, padding, zp_x, zp_y, act_min, act_max):
    return KQ.conv2d_int8(x, w, bias, mult, shift, kernel[0], kernel[1], stride[0], stride[1], padding[0],
                          padding[1], zp_x, zp_y, act_min, act_max)


def _gemm_cost(node):
    k = node.inputs[1].shape[1]
    return 2 * node.size * k, node.nbytes + sum(i.nbytes for i in node.inputs)


register(Primitive("conv2d_int8", "opaque", _conv_int8_infer, _conv_int8_kernel, cost_fn=_gemm_cost,
                   attrs_doc="kernel, stride, padding, zp_x, zp_y, act_min, act_max",
                   extra={"mindspore_name": "Conv2DInt8"}))


def _dense_int8_infer(shapes, dtypes, attrs):
    name = "dense_int8"
    _int8_in(name, shapes, dtypes, 0, 2)
    _int8_in(name, shapes, dtypes, 1, 2)
    _need(name, shapes[0][1] == shapes[1][1], f"x {tuple(shapes[0])} and weight {tuple(shapes[1])} do not fit")
    _channel_vectors(name, shapes, dtypes, 2, shapes[1][0])
    return (shapes[0][0], shapes[1][0]), np.dtype(np.int8)


register(Primitive("dense_int8", "opaque", _dense_int8_infer,
                   lambda x, w, bias, mult, shift, zp_y, act_min, act_max: KQ.dense_int8(
                       x, w, bias, mult, shift, zp_y, act_min, act_max),
                   cost_fn=_gemm_cost, attrs_doc="zp_y, act_min, act_max", extra={"mindspore_name": "MatMulInt8"}))


def _same_int8(name):
    def infer(shapes, dtypes, attrs):
        _int8_in(name, shapes, dtypes, 0)
        return shapes[0], np.dtype(np.int8)
    return infer


register(Primitive("requant_int8", "elementwise", _same_int8("requant_int8"),
                   lambda x, zp_in, mult, shift, zp_out, act_min, act_max: KQ.requant_int8(
                       x, zp_in, mult, shift, zp_out, act_min, act_max),
                   flops_per_element=3, attrs_doc="zp_in, mult, shift, zp_out, act_min, act_max",
                   extra={"mindspore_name": "Requant"}))
register(Primitive("relu_int8", "elementwise", _same_int8("relu_int8"),
                   lambda x, zero_point, act_max: KQ.relu_int8(x, zero_point, act_max),
                   attrs_doc="zero_point, act_max", extra={"mindspore_name": "ReLUInt8"}))


def _maxpool_int8_infer(shapes, dtypes, attrs):
    _int8_in("max_pool_int8", shapes, dtypes, 0, 4)
    n, c, h, w = shapes[0]
    (kh, kw), (sh, sw) = attrs["kernel"], attrs["stride"]
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    _need("max_pool_int8", oh > 0 and ow > 0, f"a {kh}x{kw} window does not fit {h}x{w}")
    return (n, c, oh, ow), np.dtype(np.int8)


register(Primitive("max_pool_int8", "opaque", _maxpool_int8_infer,
                   lambda x, kernel, stride: KQ.maxpool_int8(x, kernel[0], kernel[1], stride[0], stride[1]),
                   cost_fn=lambda n: (n.inputs[0].size, n.nbytes + n.inputs[0].nbytes),
                   attrs_doc="kernel, stride", extra={"mindspore_name": "MaxPoolInt8"}))


def _add_int8_infer(shapes, dtypes, attrs):
    _int8_in("add_int8", shapes, dtypes, 0)
    _int8_in("add_int8", shapes, dtypes, 1)
    _need("add_int8", tuple(shapes[0]) == tuple(shapes[1]), f"shapes {tuple(shapes[0])} and {tuple(shapes[1])} differ")
    return shapes[0], np.dtype(np.int8)


register(Primitive("add_int8", "elementwise", _add_int8_infer,
                   lambda a, b, **p: KQ.add_int8(a, b, p["zp_a"], p["mult_a"], p["shift_a"], p["zp_b"], p["mult_b"],
                                                 p["shift_b"], p["left_shift"], p["zp_out"], p["mult_out"],
                                                 p["shift_out"], p["act_min"], p["act_max"]),
                   flops_per_element=8, attrs_doc="zp_a, mult_a, shift_a, zp_b, mult_b, shift_b, left_shift, "
                                                  "zp_out, mult_out, shift_out, act_min, act_max",
                   extra={"mindspore_name": "AddInt8"}))
