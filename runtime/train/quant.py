"""Quantization-aware training and int8 deployment.

* ``convert_quant_network(net, ...)`` rewrites a float network built from the fused Cells
  (``nn.Conv2dBnAct``, ``nn.DenseBnAct``, ``nn.TensorAdd``) into its QAT twin, MindSpore 0.5's converter
  shape: each fused conv becomes ``Conv2dBnFoldQuant`` (BN folded, ``bn_fold=True``) or ``Conv2dQuant``,
  each fused dense a ``DenseQuant``, their activation an ``ActQuant`` (the activation, then an EMA
  fake quant of the output), each ``TensorAdd`` a ``TensorAddQuant``. Trained weights and BN statistics
  carry over. The Cells are replaced inside ``net`` (as MindSpore does); the returned ``QuantNetwork``
  wraps it with an input fake quant and owns the step counter shared by every quant Cell.
* ``convert_to_int8(qat_net, input_shape)`` lowers the trained QAT network to an ``Int8Model``:
  int8 per-channel symmetric weights, int32 biases at scale ``s_x * s_w``, per-tensor activation scales and
  zero points, requantization by a Q31 multiplier in [0.5, 1) and a rounding shift (computed when the
  model is prepared, as TFLite does). The model runs as a graph of int8 primitives through the executor.
* ``Int8Model.save(path)`` / ``load_int8(path)``: one file (magic, zlib-compressed JSON header, raw int8 /
  int32 / float32 sections).
* ``export_onnx(model, path)``: QDQ ONNX (opset 13, per-axis weight scales); needs the optional extra
  ``pip install .[onnx]``.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib

import numpy as np

from runtime import core
from runtime.core import GraphBuilder, Tensor, building
from runtime.compiler import compile as compile_graph
from runtime.executor import CompiledGraph
from runtime.ir.graph import Graph
from runtime.nn.cell import Cell
from runtime.nn.layers import (GELU, AvgPool2d, BatchNorm1d, BatchNorm2d, Conv2d, Dense, Embedding, Flatten, LayerNorm,
                               MaxPool2d, ReLU, SequentialCell, Sigmoid, Softmax, Tanh)
from runtime.nn.parameter import Parameter
from runtime.nn.quant import (ActQuant, Conv2dBnAct, Conv2dBnFoldQuant, Conv2dQuant, DenseBnAct, DenseQuant,
                              FakeQuantWithMinMax, TensorAdd, TensorAddQuant, step_counter)
from runtime.ops import api as F
from runtime.ops.quant import quant_params, quant_range, quantize_multiplier
from runtime.ops.registry import ShapeError


class QuantConversionError(ValueError):
    """A network cannot be converted (names the Cell and the reason)."""


# ----------------------------------------------------------------------------------------------
# float network -> QAT network
# ----------------------------------------------------------------------------------------------
class QuantNetwork(Cell):
    """A converted network: input fake quant, the network, and the shared step counter (one tick per step)."""

    def __init__(self, network, input_quant: FakeQuantWithMinMax, step: Parameter):
        super().__init__()
        self.input_quant = input_quant
        self.network = network
        self.step = step

    def construct(self, x):
        out = self.network(self.input_quant(x))
        if self.training:
            F.assign(self.step, F.add(self.step, 1))
        return out


def _pair2(v, what):
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"convert_quant_network: {what} must be one value or a (weight, activation) pair, got {v}")
        return tuple(v)
    return (v, v)


def _copy(dst: Parameter, src: Parameter):
    dst.set_data(src.data)


def convert_quant_network(network, bn_fold=True, freeze_bn=10000000, quant_delay=(0, 0), num_bits=(8, 8),
                          per_channel=(True, False), symmetric=(True, False), narrow_range=(False, False),
                          ema_decay=0.999):
    """Rewrite a float network of fused Cells into its quantization-aware twin (a ``QuantNetwork``).

    Pairs are (weights, activations). Weights: per channel by default and symmetric; activations: per tensor,
    asymmetric, EMA min/max with ``ema_decay``. ``freeze_bn``: steps after which folded BN uses its running
    statistics. ``quant_delay``: steps before fake quantization starts."""
    if not isinstance(network, Cell):
        raise TypeError(f"convert_quant_network: expects a Cell, got {type(network).__name__}")
    qd, nb, pc, sy, nr = (_pair2(quant_delay, "quant_delay"), _pair2(num_bits, "num_bits"),
                          _pair2(per_channel, "per_channel"), _pair2(symmetric, "symmetric"),
                          _pair2(narrow_range, "narrow_range"))
    for b in nb:
        if not 2 <= int(b) <= 8:
            raise ValueError(f"convert_quant_network: num_bits must be in 2..8, got {num_bits}")
    if pc[1]:
        raise ValueError("convert_quant_network: activations are quantized per tensor; per_channel must be "
                         "(True|False, False)")
    step = step_counter()
    network.get_parameters()   # name the float parameters by path before cells move
    w_kw = dict(quant_delay=int(qd[0]), per_channel=bool(pc[0]), num_bits=int(nb[0]), symmetric=bool(sy[0]),
                narrow_range=bool(nr[0]), step=step)
    a_kw = dict(ema_decay=float(ema_decay), num_bits=int(nb[1]), symmetric=bool(sy[1]), narrow_range=bool(nr[1]),
                quant_delay=int(qd[1]), step=step)
    converted = [0]

    def act_quant(fused):
        return ActQuant(fused.activation if fused.has_act else None, **a_kw)

    def convert_conv(cell: Conv2dBnAct):
        conv: Conv2d = cell.conv
        common = dict(kernel_size=conv.kernel_size, stride=conv.stride, pad_mode="pad", padding=conv.padding)
        if cell.has_bn and bn_fold:
            bn = cell.batchnorm
            if conv.has_bias:
                raise QuantConversionError(f"{cell!r}: a conv with a bias followed by BatchNorm cannot be folded; "
                                           f"build it with has_bias=False")
            q = Conv2dBnFoldQuant(conv.in_channels, conv.out_channels, eps=bn.eps, momentum=bn.momentum,
                                  freeze_bn=freeze_bn, **common, **w_kw)
            for a, b in ((q.gamma, bn.gamma), (q.beta, bn.beta), (q.moving_mean, bn.moving_mean),
                         (q.moving_variance, bn.moving_variance)):
                _copy(a, b)
            cell._cells.pop("batchnorm")
            object.__delattr__(cell, "batchnorm")
            cell.has_bn = False
        else:
            q = Conv2dQuant(conv.in_channels, conv.out_channels, has_bias=conv.has_bias, **common, **w_kw)
        install(cell, "conv", q, conv)

    def convert_dense(cell: DenseBnAct):
        d: Dense = cell.dense
        install(cell, "dense", DenseQuant(d.in_channels, d.out_channels, has_bias=d.has_bias, **w_kw), d)

    def install(cell, attr, q, float_layer):
        """Put the quant layer ``q`` (given the float layer's weights) and an ActQuant into the fused cell."""
        _copy(q.weight, float_layer.weight)
        if float_layer.has_bias:
            _copy(q.bias, float_layer.bias)
        setattr(cell, attr, q)
        cell.activation = act_quant(cell)
        cell.has_act = True

    def walk(cell: Cell):
        for name, child in list(cell._cells.items()):
            if isinstance(child, Conv2dBnAct):
                convert_conv(child)
            elif isinstance(child, DenseBnAct):
                convert_dense(child)
            elif isinstance(child, TensorAdd):
                setattr(cell, name, TensorAddQuant(**a_kw))
            else:
                walk(child)
                continue
            converted[0] += 1

    if isinstance(network, (Conv2dBnAct, DenseBnAct, TensorAdd)):
        network = SequentialCell(network) if not isinstance(network, TensorAdd) else network
    walk(network)
    if converted[0] == 0:
        raise QuantConversionError(
            f"convert_quant_network: {network!r} has no Conv2dBnAct / DenseBnAct / TensorAdd cells to convert; "
            f"build the float network from the fused cells (nn.Conv2dBnAct, nn.DenseBnAct)")
    input_quant = FakeQuantWithMinMax(ema=True, ema_decay=ema_decay, num_bits=nb[1], symmetric=sy[1],
                                      narrow_range=nr[1], quant_delay=qd[1], step=step)
    return QuantNetwork(network, input_quant, step)


# ----------------------------------------------------------------------------------------------
# QAT network -> int8 layer list (lowering)
# ----------------------------------------------------------------------------------------------
class _Value:
    """A value flowing through the network during lowering: its per-sample shape (the batch is symbolic)."""

    dtype = np.dtype(np.int8)

    def __init__(self, sample_shape):
        self.sample_shape = tuple(int(s) for s in sample_shape)

    @property
    def shape(self):
        return (1,) + self.sample_shape

    @property
    def ndim(self):
        return 1 + len(self.sample_shape)


class _FloatInput(_Value):
    """The network's float input."""

    dtype = np.dtype(np.float32)


class _QValue(_Value):
    """A quantized int8 value: the op producing it and its (scale, zero point, range)."""

    def __init__(self, ref, shape, scale, zp, qmin, qmax):
        super().__init__(shape)
        self.ref = ref
        self.scale, self.zp, self.qmin, self.qmax = float(scale), int(zp), int(qmin), int(qmax)


class _Pending(_Value):
    """A conv / dense whose int32 accumulator waits for the fake quant that fixes its output scale."""

    dtype = np.dtype(np.int32)

    def __init__(self, kind, x: _QValue, w, b, wq, attrs, shape, path, cell=None):
        super().__init__(shape)
        self.kind, self.x, self.w, self.b, self.wq, self.attrs, self.cell = kind, x, w, b, wq, attrs, cell
        self.bn = None
        self.path, self.relu = path, False


def _signed(zp_u, num_bits, narrow_range):
    off = 1 << (num_bits - 1)
    qmin, qmax = quant_range(num_bits, narrow_range)
    return int(zp_u) - off, qmin - off, qmax - off


def _act_qparams(fq: FakeQuantWithMinMax):
    """(scale, nmin, nmax, zp_signed, qmin_signed, qmax_signed) of a per-tensor activation fake quant."""
    if fq.per_channel:
        raise QuantConversionError(f"{fq!r}: per-channel activation quantization has no int8 lowering")
    if not fq.ema:
        raise QuantConversionError(f"{fq!r}: an activation fake quant must track its range (ema=True) to be "
                                   f"deployed with a fixed scale")
    scale, nmin, nmax, zp = quant_params(fq.minq.data, fq.maxq.data, fq.num_bits, fq.narrow_range, fq.symmetric)
    z, lo, hi = _signed(zp[0], fq.num_bits, fq.narrow_range)
    return float(scale[0]), float(nmin[0]), float(nmax[0]), z, lo, hi


class _Lowering:
    """Runs the network's own ``construct`` with every leaf Cell replaced by its int8 lowering."""

    def __init__(self, snap_biases=False):
        self.ops: list[dict] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.snap_biases = snap_biases

    def emit(self, op: dict, arrays: dict | None = None) -> int:
        k = len(self.ops)
        for name, arr in (arrays or {}).items():
            key = f"{k}.{name}"
            self.arrays[key] = arr
            op.setdefault("arrays", {})[name] = key
        self.ops.append(op)
        return k

    @staticmethod
    def path():
        return core.current_scope()

    def fail(self, cell, msg):
        raise QuantConversionError(f"convert_to_int8: {cell!r} at '{self.path() or type(cell).__name__}': {msg}")

    def need_q(self, cell, x):
        if isinstance(x, _Pending):
            self.fail(cell, f"its input comes from the {x.kind} at '{x.path}', whose int32 output has no "
                            f"output fake quant to fix its scale (use Conv2dBnAct / DenseBnAct and "
                            f"convert_quant_network, which add one)")
        if not isinstance(x, _QValue):
            self.fail(cell, f"expects a quantized value, got {type(x).__name__}")
        return x

    # -- leaves ------------------------------------------------------------------------------------
    def fake_quant(self, cell: FakeQuantWithMinMax, x):
        if isinstance(x, _FloatInput):
            s, nmin, nmax, z, lo, hi = _act_qparams(cell)
            ref = self.emit({"op": "quantize", "in": [-1], "name": self.path(), "scale": s, "nmin": nmin,
                             "nmax": nmax, "qmin": lo, "zp": z, "qmax": hi})
            return _QValue(ref, x.sample_shape, s, z, lo, hi)
        if isinstance(x, _Pending):
            return self.finish(cell, x)
        x = self.need_q(cell, x)
        s, _, _, z, lo, hi = _act_qparams(cell)
        ref = self.emit({"op": "requant", "in": [x.ref], "name": self.path(), "scale": s, "zp": z, "qmin": lo,
                         "qmax": hi, "act_min": lo, "act_max": hi})
        return _QValue(ref, x.sample_shape, s, z, lo, hi)

    def finish(self, fq: FakeQuantWithMinMax, p: _Pending):
        s_y, _, _, z_y, lo, hi = _act_qparams(fq)
        wq: FakeQuantWithMinMax = p.wq
        w = np.asarray(p.w, np.float32)
        axes = tuple(range(1, w.ndim))
        if wq.per_channel:
            wmin, wmax = w.min(axis=axes), w.max(axis=axes)
        else:
            wmin, wmax = np.full(w.shape[0], w.min(), np.float32), np.full(w.shape[0], w.max(), np.float32)
        scale, nmin, nmax, zp = quant_params(wmin, wmax, wq.num_bits, wq.narrow_range, wq.symmetric)
        if not wq.symmetric or np.any(zp != (1 << (wq.num_bits - 1))):
            raise QuantConversionError(f"convert_to_int8: the weights at '{p.path}' are quantized asymmetrically; "
                                       f"the int8 engine needs symmetric weights (symmetric=(True, ...))")
        cs = (-1,) + (1,) * (w.ndim - 1)
        t = (np.clip(w, nmin.reshape(cs), nmax.reshape(cs)) - nmin.reshape(cs)) / scale.reshape(cs) + np.float32(0.5)
        qmin_u, _ = quant_range(wq.num_bits, wq.narrow_range)
        q = (np.floor(t).astype(np.int32) + qmin_u - (1 << (wq.num_bits - 1))).astype(np.int8)
        acc_scale = np.float64(p.x.scale) * scale.astype(np.float64)
        bias = np.zeros(w.shape[0], np.float64) if p.b is None else np.asarray(p.b, np.float64)
        qb = np.round(bias / acc_scale)
        if np.any(np.abs(qb) > 2 ** 31 - 1):
            raise QuantConversionError(f"convert_to_int8: the bias at '{p.path}' overflows int32 at scale s_x*s_w")
        if self.snap_biases:
            self.snap(p, qb * acc_scale)
        act_min = max(lo, z_y) if p.relu else lo
        op = {"op": p.kind, "in": [p.x.ref], "name": p.path, "scale": s_y, "zp": z_y, "qmin": lo, "qmax": hi,
              "act_min": act_min, "act_max": hi, "relu": p.relu, "w_bits": wq.num_bits, **p.attrs}
        ref = self.emit(op, {"w": q.reshape(w.shape[0], -1), "bias": qb.astype(np.int32),
                             "w_scale": scale.astype(np.float32)})
        return _QValue(ref, p.sample_shape, s_y, z_y, lo, hi)

    @staticmethod
    def snap(p: _Pending, b_int):
        """Move the QAT cell's float bias onto the int32 grid the engine uses, so that the fake-quant
        simulation computes the deployed arithmetic (the bias is the one value the simulation keeps in float)."""
        cell = p.cell
        if p.bn is not None or cell is None:
            raise QuantConversionError(f"convert_to_int8: snap_biases needs BN folded by Conv2dBnFoldQuant "
                                       f"(bn_fold=True); '{p.path}' has a separate BatchNorm")
        b_old = np.asarray(p.b, np.float64) if p.b is not None else None
        if isinstance(cell, Conv2dBnFoldQuant):
            cell.beta.set_data(cell.beta.data.astype(np.float64) + (b_int - b_old))
        elif getattr(cell, "has_bias", False):
            cell.bias.set_data(b_int)
        elif np.any(b_int != 0):
            raise QuantConversionError(f"convert_to_int8: '{p.path}' has no bias to snap")

    def conv(self, cell, x, w, b):
        x = self.need_q(cell, x)
        if len(x.sample_shape) != 3:
            self.fail(cell, f"expects (N, C, H, W) input, got (N, {', '.join(map(str, x.sample_shape))}) -- check "
                            f"input_shape")
        c, h, wd = x.sample_shape
        (kh, kw), (sh, sw), (ph, pw) = cell.kernel_size, cell.stride, cell.padding
        oh, ow = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
        if c != cell.in_channels:
            self.fail(cell, f"expects {cell.in_channels} input channels, got {c}")
        attrs = {"kernel": [kh, kw], "stride": [sh, sw], "padding": [ph, pw]}
        return _Pending("conv", x, w, b, cell.fake_quant_weight, attrs, (cell.out_channels, oh, ow), self.path(),
                        cell)

    def conv_quant(self, cell: Conv2dQuant, x):
        return self.conv(cell, x, cell.weight.data, cell.bias.data if cell.has_bias else None)

    def conv_bn_fold(self, cell: Conv2dBnFoldQuant, x):
        w, b = fold_bn(cell.weight.data, cell.gamma.data, cell.beta.data, cell.moving_mean.data,
                       cell.moving_variance.data, cell.eps)
        return self.conv(cell, x, w, b)

    def dense_quant(self, cell: DenseQuant, x):
        x = self.need_q(cell, x)
        if x.sample_shape != (cell.in_channels,):
            self.fail(cell, f"expects input of shape (N, {cell.in_channels}), got (N, {x.sample_shape})")
        p = _Pending("dense", x, cell.weight.data, cell.bias.data if cell.has_bias else None,
                     cell.fake_quant_weight, {}, (cell.out_channels,), self.path(), cell)
        if cell.activation is not None:
            p = self.activation(cell.activation, p)
        return p

    def batchnorm(self, cell, x):
        """A BatchNorm left unfolded (bn_fold=False) after a quant conv / dense: folded here, into the
        float weights, before they are quantized."""
        if not isinstance(x, _Pending) or x.relu:
            self.fail(cell, "a float BatchNorm can only follow a quantized conv / dense directly (it is folded "
                            "into their weights); convert with bn_fold=True")
        shp = (-1,) + (1,) * (np.ndim(x.w) - 1)
        std = np.sqrt(cell.moving_variance.data + np.float32(cell.eps))
        k = cell.gamma.data / std
        x.w = x.w * k.reshape(shp)
        b = np.zeros_like(k) if x.b is None else x.b
        x.b = (b - cell.moving_mean.data) * k + cell.beta.data
        x.bn = cell
        return x

    def activation(self, cell, x):
        if not isinstance(cell, ReLU):
            self.fail(cell, "only ReLU activations have an int8 lowering")
        if isinstance(x, _Pending):
            x.relu = True
            return x
        x = self.need_q(cell, x)
        ref = self.emit({"op": "relu", "in": [x.ref], "name": self.path(), "scale": x.scale, "zp": x.zp,
                         "qmin": x.qmin, "qmax": x.qmax})
        return _QValue(ref, x.sample_shape, x.scale, x.zp, x.qmin, x.qmax)

    def act_quant(self, cell: ActQuant, x):
        if cell.act is not None:
            x = self.activation(cell.act, x)
        return self.fake_quant(cell.fake_quant_act, x)

    def max_pool(self, cell: MaxPool2d, x):
        x = self.need_q(cell, x)
        if len(x.sample_shape) != 3:
            self.fail(cell, f"expects (N, C, H, W) input, got (N, {', '.join(map(str, x.sample_shape))})")
        if cell.padding != (0, 0):
            self.fail(cell, "padded max pooling (pad_mode='same') has no int8 lowering")
        c, h, w = x.sample_shape
        (kh, kw), (sh, sw) = cell.kernel_size, cell.stride
        ref = self.emit({"op": "maxpool", "in": [x.ref], "name": self.path(), "kernel": [kh, kw], "stride": [sh, sw],
                         "scale": x.scale, "zp": x.zp, "qmin": x.qmin, "qmax": x.qmax})
        return _QValue(ref, (c, (h - kh) // sh + 1, (w - kw) // sw + 1), x.scale, x.zp, x.qmin, x.qmax)

    def flatten(self, cell, x):
        x = self.need_q(cell, x)
        ref = self.emit({"op": "flatten", "in": [x.ref], "name": self.path(), "scale": x.scale, "zp": x.zp,
                         "qmin": x.qmin, "qmax": x.qmax})
        return _QValue(ref, (int(np.prod(x.sample_shape)),), x.scale, x.zp, x.qmin, x.qmax)

    def tensor_add(self, cell: TensorAddQuant, a, b):
        a, b = self.need_q(cell, a), self.need_q(cell, b)
        if a.sample_shape != b.sample_shape:
            self.fail(cell, f"adds values of shapes {a.sample_shape} and {b.sample_shape}")
        s, _, _, z, lo, hi = _act_qparams(cell.fake_quant_act)
        ref = self.emit({"op": "add", "in": [a.ref, b.ref], "name": self.path(), "scale": s, "zp": z, "qmin": lo,
                         "qmax": hi, "act_min": lo, "act_max": hi})
        return _QValue(ref, a.sample_shape, s, z, lo, hi)

    def unsupported(self, cell, *args):
        self.fail(cell, f"{type(cell).__name__} has no int8 lowering; the int8 engine covers the fused cells "
                        f"(Conv2dBnAct, DenseBnAct, TensorAdd) once convert_quant_network has converted them, "
                        f"MaxPool2d without padding, Flatten and ReLU")


def fold_bn(w, gamma, beta, mean, var, eps):
    """Fold inference BatchNorm into conv weights and a bias, with the float32 operations (and order) that
    ``Conv2dBnFoldQuant`` uses in evaluation, so the weights quantize to the same integers."""
    std = np.sqrt(var + np.float32(eps))
    k = gamma / std
    w_fold = w * k.reshape((-1,) + (1,) * (w.ndim - 1))
    bias = beta - (gamma * mean) / std
    return w_fold, bias


_LEAVES = (
    (FakeQuantWithMinMax, "fake_quant"), (Conv2dBnFoldQuant, "conv_bn_fold"), (Conv2dQuant, "conv_quant"),
    (DenseQuant, "dense_quant"), (ActQuant, "act_quant"), (TensorAddQuant, "tensor_add"), (MaxPool2d, "max_pool"),
    (Flatten, "flatten"), (ReLU, "activation"), (BatchNorm2d, "batchnorm"), (BatchNorm1d, "batchnorm"),
    (Conv2d, "unsupported"), (Dense, "unsupported"), (AvgPool2d, "unsupported"), (LayerNorm, "unsupported"),
    (Embedding, "unsupported"), (GELU, "unsupported"), (Sigmoid, "unsupported"), (Tanh, "unsupported"),
    (Softmax, "unsupported"),
)


def _leaf_method(cell):
    for cls, meth in _LEAVES:
        if isinstance(cell, cls):
            return meth
    return None


def convert_to_int8(network, input_shape, snap_biases: bool = False) -> "Int8Model":
    """Lower a trained QAT network (``convert_quant_network``'s result) to an integer-only ``Int8Model``.

    ``input_shape``: the shape of one sample, e.g. (1, 8, 8). ``snap_biases=True`` also moves the QAT
    network's float biases onto the int32 grid of the deployed model (a change below half a step of
    s_x * s_w per channel), after which the network's fake-quant evaluation simulates the engine exactly
    up to float32 rounding."""
    if not isinstance(network, QuantNetwork):
        raise QuantConversionError(f"convert_to_int8: expects the QuantNetwork returned by convert_quant_network, "
                                   f"got {type(network).__name__}")
    low = _Lowering(snap_biases)
    patched = []
    was_training = network.training
    network.set_train(False)
    try:
        for _, cell in network.cells_and_names():
            meth = _leaf_method(cell)
            if meth is not None:
                fn = getattr(low, meth)
                object.__setattr__(cell, "construct", (lambda c, f: (lambda *a: f(c, *a)))(cell, fn))
                patched.append(cell)
        try:
            out = network(_FloatInput(input_shape))
        except QuantConversionError:
            raise
        except (AttributeError, TypeError, ShapeError) as e:
            raise QuantConversionError(
                f"convert_to_int8: the network applies an operation outside the quant Cells to a quantized value "
                f"near '{core.current_scope() or type(network).__name__}' ({type(e).__name__}: {e}); express it "
                f"with Cells that have an int8 lowering (fused cells, MaxPool2d, Flatten, ReLU, TensorAdd)") from None
    finally:
        for cell in patched:
            cell.__dict__.pop("construct", None)
        network.set_train(was_training)
    if isinstance(out, _Pending):
        low.fail(network, f"the network ends in the {out.kind} at '{out.path}' without an output fake quant")
    if not isinstance(out, _QValue):
        low.fail(network, "the network's output is not a quantized value")
    low.emit({"op": "dequantize", "in": [out.ref], "name": "output", "scale": out.scale, "zp": out.zp,
              "qmin": out.qmin, "qmax": out.qmax})
    return Int8Model(low.ops, low.arrays, tuple(int(s) for s in input_shape))


# ----------------------------------------------------------------------------------------------
# the int8 model
# ----------------------------------------------------------------------------------------------
_MAGIC = b"INSIGHT-INT8\x00\x01"


class Int8Model:
    """An integer-only model: a list of int8 ops with their tensors; runs as a graph through the executor.

    ``predict(x)`` returns float32 outputs (dequantized), ``predict_quantized(x)`` the int8 outputs."""

    def __init__(self, ops: list[dict], arrays: dict[str, np.ndarray], input_shape: tuple):
        self.ops = ops
        self.arrays = arrays
        self.input_shape = tuple(input_shape)
        self._graphs: dict = {}
        self._prepare()

    # -- requantization parameters (TFLite's Prepare: from the float scales, once) --------------------
    def _in_scale(self, op, k=0):
        ref = op["in"][k]
        return None if ref < 0 else self.ops[ref]["scale"]

    def _prepare(self):
        self.runtime: list[dict] = []
        for op in self.ops:
            kind = op["op"]
            r: dict = {}
            if kind in ("conv", "dense"):
                w = self.arrays[op["arrays"]["w"]]
                ws = self.arrays[op["arrays"]["w_scale"]].astype(np.float64)
                s_x = self._in_scale(op)
                zp_x = self.ops[op["in"][0]]["zp"]
                mults = [quantize_multiplier(s_x * s / op["scale"]) for s in ws]
                r["mult"] = np.array([m for m, _ in mults], np.int32)
                r["shift"] = np.array([s for _, s in mults], np.int32)
                wsum = w.astype(np.int64).sum(axis=1)
                b = self.arrays[op["arrays"]["bias"]].astype(np.int64) - zp_x * wsum
                if np.any(np.abs(b) > 2 ** 31 - 1):
                    raise QuantConversionError(f"Int8Model: the folded bias of '{op['name']}' overflows int32")
                r["bias"] = b.astype(np.int32)
                r["zp_x"] = zp_x
            elif kind == "requant":
                r["mult"], r["shift"] = quantize_multiplier(self._in_scale(op) / op["scale"])
                r["zp_in"] = self.ops[op["in"][0]]["zp"]
            elif kind == "add":
                sa, sb, so = self._in_scale(op, 0), self._in_scale(op, 1), op["scale"]
                left = 20
                twice = 2.0 * max(sa, sb)
                r.update(left_shift=left, zp_a=self.ops[op["in"][0]]["zp"], zp_b=self.ops[op["in"][1]]["zp"])
                r["mult_a"], r["shift_a"] = quantize_multiplier(sa / twice)
                r["mult_b"], r["shift_b"] = quantize_multiplier(sb / twice)
                r["mult_out"], r["shift_out"] = quantize_multiplier(twice / ((1 << left) * so))
            self.runtime.append(r)

    # -- graph ----------------------------------------------------------------------------------------
    def build_graph(self, batch: int) -> Graph:
        g = Graph("int8_inference")
        b = GraphBuilder(g)
        with building(b):
            x = b.input("data", (batch,) + self.input_shape, np.dtype(np.float32))
            vals = []
            for op, r in zip(self.ops, self.runtime):
                ins = [x if i < 0 else vals[i] for i in op["in"]]
                with core.scope_override(op["name"] or op["op"]):
                    vals.append(self._bind(op, r, ins, batch))
            g.outputs = {"logits": vals[-1].node, "quantized": vals[-2].node}
        return g

    def _arr(self, op, name):
        return Tensor(self.arrays[op["arrays"][name]])

    def _bind(self, op, r, ins, batch):
        kind = op["op"]
        if kind == "quantize":
            return core.bind("quantize", ins, {"scale": op["scale"], "nmin": op["nmin"], "nmax": op["nmax"],
                                               "qmin": op["qmin"]})
        if kind in ("conv", "dense"):
            consts = [self._arr(op, "w"), Tensor(r["bias"]), Tensor(r["mult"]), Tensor(r["shift"])]
            attrs = {"zp_y": op["zp"], "act_min": op["act_min"], "act_max": op["act_max"]}
            if kind == "conv":
                attrs.update(kernel=tuple(op["kernel"]), stride=tuple(op["stride"]), padding=tuple(op["padding"]),
                             zp_x=r["zp_x"])
                return core.bind("conv2d_int8", ins + consts, attrs)
            return core.bind("dense_int8", ins + consts, attrs)
        if kind == "maxpool":
            return core.bind("max_pool_int8", ins, {"kernel": tuple(op["kernel"]), "stride": tuple(op["stride"])})
        if kind == "flatten":
            return F.reshape(ins[0], (batch, -1))
        if kind == "relu":
            return core.bind("relu_int8", ins, {"zero_point": op["zp"], "act_max": op["qmax"]})
        if kind == "requant":
            return core.bind("requant_int8", ins, {"zp_in": r["zp_in"], "mult": r["mult"], "shift": r["shift"],
                                                   "zp_out": op["zp"], "act_min": op["act_min"],
                                                   "act_max": op["act_max"]})
        if kind == "add":
            return core.bind("add_int8", ins, {**r, "zp_out": op["zp"], "act_min": op["act_min"],
                                               "act_max": op["act_max"]})
        if kind == "dequantize":
            return core.bind("dequantize", ins, {"scale": op["scale"], "zero_point": op["zp"]})
        raise QuantConversionError(f"Int8Model: unknown op {kind!r} at '{op.get('name')}'")

    def compiled(self, batch: int) -> CompiledGraph:
        exe = self._graphs.get(batch)
        if exe is None:
            exe = self._graphs[batch] = compile_graph(self.build_graph(batch))
        return exe

    def _run(self, x):
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"Int8Model: expects inputs of shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {x.shape}")
        return self.compiled(x.shape[0])({"data": x})

    def predict(self, x) -> np.ndarray:
        """Float32 outputs (the int8 result dequantized)."""
        return self._run(x)["logits"]

    def predict_quantized(self, x) -> np.ndarray:
        """The int8 outputs (before dequantization)."""
        return self._run(x)["quantized"]

    @property
    def output_quant(self) -> tuple[float, int]:
        """(scale, zero point) of the output."""
        return self.ops[-1]["scale"], self.ops[-1]["zp"]

    def to_quantized(self, y) -> np.ndarray:
        """Float outputs of the fake-quant simulation (values on the output grid) -> the int8 domain."""
        s, z = self.output_quant
        return np.clip(np.rint(np.asarray(y, np.float64) / s) + z, -128, 127).astype(np.int8)

    def weight_bytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))

    # -- file -------------------------------------------------------------------------------------------
    def save(self, path) -> str:
        """Write the model as one file: magic, header length, zlib(JSON header), then the raw arrays."""
        path = os.fspath(path)
        blobs, index = [], {}
        off = 0
        for key, arr in self.arrays.items():
            a = np.ascontiguousarray(arr)
            index[key] = [a.dtype.str, list(a.shape), off]
            blobs.append(a.tobytes())
            off += a.nbytes
        header = zlib.compress(json.dumps({"v": 1, "input": list(self.input_shape), "ops": self.ops,
                                           "arrays": index}, separators=(",", ":")).encode(), 9)
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + struct.pack("<I", len(header)) + header)
            for b in blobs:
                f.write(b)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path) -> "Int8Model":
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"load_int8: no int8 model file at {path}") from None
        if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 4:
            raise ValueError(f"load_int8: {path} is not an int8 model file (bad magic)")
        (n,) = struct.unpack_from("<I", data, len(_MAGIC))
        start = len(_MAGIC) + 4
        try:
            meta = json.loads(zlib.decompress(data[start:start + n]))
        except (zlib.error, ValueError) as e:
            raise ValueError(f"load_int8: {path} has a corrupt header ({e})") from None
        if meta.get("v") != 1:
            raise ValueError(f"load_int8: {path} is format version {meta.get('v')}; this runtime reads version 1")
        body = memoryview(data)[start + n:]
        arrays = {}
        for key, (dt, shape, off) in meta["arrays"].items():
            count = int(np.prod(shape, dtype=np.int64))
            nbytes = count * np.dtype(dt).itemsize
            if off + nbytes > len(body):
                raise ValueError(f"load_int8: {path} is truncated (array {key!r} needs bytes {off}..{off + nbytes}, "
                                 f"the file has {len(body)})")
            arrays[key] = np.frombuffer(body, dtype=dt, count=count, offset=off).reshape(shape).copy()
        return cls(meta["ops"], arrays, tuple(meta["input"]))


def save_int8(model: Int8Model, path) -> str:
    return model.save(path)


def load_int8(path) -> Int8Model:
    return Int8Model.load(path)


# ----------------------------------------------------------------------------------------------
# ONNX (QDQ) export
# ----------------------------------------------------------------------------------------------
def export_onnx(model: Int8Model, path, opset: int = 13) -> str:
    """Write ``model`` as a QDQ ONNX model: QuantizeLinear / DequantizeLinear around int8 activations,
    int8 weights with per-axis scales (axis 0), int32 biases at scale s_x * s_w. Input ``data`` (N, ...)
    float32, output ``logits`` float32. Needs ``pip install .[onnx]``."""
    if not isinstance(model, Int8Model):
        raise TypeError(f"export_onnx: expects an Int8Model (from convert_to_int8 or load_int8), got "
                        f"{type(model).__name__}")
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise ImportError("export_onnx needs the optional dependency onnx: pip install 'insight-profiler[onnx]' "
                          "(or pip install onnx onnxruntime)") from None
    if opset < 13:
        raise ValueError(f"export_onnx: per-axis weight scales need opset >= 13, got {opset}")
    nodes, inits = [], []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def qdq(src, name, scale, zp):
        """Q then DQ of a float tensor (an int8 activation between two float ops)."""
        s = const(f"{name}.scale", np.array(scale, np.float32))
        z = const(f"{name}.zp", np.array(zp, np.int8))
        nodes.append(helper.make_node("QuantizeLinear", [src, s, z], [f"{name}.q"], name=f"{name}/Quantize"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}.q", s, z], [f"{name}.dq"],
                                      name=f"{name}/Dequantize"))
        return f"{name}.dq"

    vals: list[str] = []
    for k, (op, r) in enumerate(zip(model.ops, model.runtime)):
        kind = op["op"]
        name = f"{k}_{kind}_{(op['name'] or kind).replace('/', '.')}"
        ins = ["data" if i < 0 else vals[i] for i in op["in"]]
        if kind == "quantize":
            vals.append(qdq(ins[0], name, op["scale"], op["zp"]))
        elif kind in ("conv", "dense"):
            w = model.arrays[op["arrays"]["w"]]
            ws = model.arrays[op["arrays"]["w_scale"]].astype(np.float32)
            s_x = model.ops[op["in"][0]]["scale"]
            if kind == "conv":
                o = w.shape[0]
                c = w.shape[1] // (op["kernel"][0] * op["kernel"][1])
                w = w.reshape(o, c, *op["kernel"])
            wq = const(f"{name}.w", w)
            wdq = f"{name}.w.dq"
            nodes.append(helper.make_node("DequantizeLinear", [wq, const(f"{name}.w.scale", ws),
                                                               const(f"{name}.w.zp", np.zeros(len(ws), np.int8))],
                                          [wdq], axis=0, name=f"{name}/DequantizeWeight"))
            bq = const(f"{name}.b", model.arrays[op["arrays"]["bias"]].astype(np.int32))
            bdq = f"{name}.b.dq"
            nodes.append(helper.make_node("DequantizeLinear", [bq, const(f"{name}.b.scale", (ws * np.float32(s_x))),
                                                               const(f"{name}.b.zp", np.zeros(len(ws), np.int32))],
                                          [bdq], axis=0, name=f"{name}/DequantizeBias"))
            y = f"{name}.y"
            if kind == "conv":
                ph, pw = op["padding"]
                nodes.append(helper.make_node("Conv", [ins[0], wdq, bdq], [y], kernel_shape=list(op["kernel"]),
                                              strides=list(op["stride"]), pads=[ph, pw, ph, pw], name=f"{name}/Conv"))
            else:
                nodes.append(helper.make_node("Gemm", [ins[0], wdq, bdq], [y], transB=1, name=f"{name}/Gemm"))
            if op["relu"]:
                nodes.append(helper.make_node("Relu", [y], [f"{name}.relu"], name=f"{name}/Relu"))
                y = f"{name}.relu"
            vals.append(qdq(y, name, op["scale"], op["zp"]))
        elif kind == "maxpool":
            y = f"{name}.y"
            nodes.append(helper.make_node("MaxPool", ins, [y], kernel_shape=list(op["kernel"]),
                                          strides=list(op["stride"]), name=f"{name}/MaxPool"))
            vals.append(qdq(y, name, op["scale"], op["zp"]))
        elif kind == "flatten":
            y = f"{name}.y"
            nodes.append(helper.make_node("Flatten", ins, [y], axis=1, name=f"{name}/Flatten"))
            vals.append(y)
        elif kind == "relu":
            y = f"{name}.y"
            nodes.append(helper.make_node("Relu", ins, [y], name=f"{name}/Relu"))
            vals.append(qdq(y, name, op["scale"], op["zp"]))
        elif kind == "requant":
            vals.append(qdq(ins[0], name, op["scale"], op["zp"]))
        elif kind == "add":
            y = f"{name}.y"
            nodes.append(helper.make_node("Add", ins, [y], name=f"{name}/Add"))
            vals.append(qdq(y, name, op["scale"], op["zp"]))
        elif kind == "dequantize":
            nodes.append(helper.make_node("Identity", ins, ["logits"], name="output"))
            vals.append("logits")
        else:
            raise ValueError(f"export_onnx: op {kind!r} at '{op['name']}' has no ONNX form")
    out_shape = ["N"] + [int(s) for s in _output_sample_shape(model)]
    graph = helper.make_graph(
        nodes, "insight_int8",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N"] + list(model.input_shape))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)], initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", int(opset))],
                          producer_name="insight-runtime")
    m.ir_version = min(m.ir_version, 8)
    onnx.checker.check_model(m, full_check=True)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    onnx.save(m, path)
    return path


def _output_sample_shape(model: Int8Model):
    g = model.build_graph(1)
    return g.outputs["logits"].shape[1:]


def model_nbytes(path) -> int:
    return os.path.getsize(os.fspath(path))


__all__ = ["convert_quant_network", "convert_to_int8", "QuantNetwork", "Int8Model", "save_int8", "load_int8",
           "export_onnx", "fold_bn", "QuantConversionError", "model_nbytes"]
