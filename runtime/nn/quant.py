"""Quantization-aware training Cells (MindSpore 0.5 names and semantics) and the fused float Cells.

Fused float Cells, the starting point of ``runtime.train.quant.convert_quant_network``:

* ``Conv2dBnAct``  -- Conv2d, optional BatchNorm2d (``has_bn``), optional activation;
* ``DenseBnAct``   -- Dense, optional BatchNorm1d, optional activation;
* ``TensorAdd``    -- x1 + x2 (a residual join).

Their QAT twins:

* ``FakeQuantWithMinMax`` -- an observer (per tensor or per channel; ``ema=True``: ``minq`` / ``maxq`` hold an
  exponential moving average with ``ema_decay`` whose first observed batch seeds the average; ``ema=False``,
  as for weights: the current tensor's min / max, in training and evaluation alike) followed by a
  fake-quant primitive with the straight-through estimator; in training the observer is one task
  (``minmax_update_*``: min and max in one sweep, the EMA) whose range the fake quant uses and ``minq`` /
  ``maxq`` keep (with ``ema``);
  ``quant_delay`` training steps pass the tensor through unquantized (the observer still runs);
* ``Conv2dBnFoldQuant`` -- BatchNorm folded into the conv weights during training: the weights are folded
  with the running std (``W * gamma / sigma_running``), fake-quantized per channel and convolved; the batch
  statistics are those of that output scaled back by ``sigma_running / gamma`` (the unfolded conv, as
  PyTorch's ConvBn2d computes them: one convolution where MindSpore runs a second one with the float
  weights); the result is corrected by ``sigma_running / sigma_batch`` with bias
  ``beta - gamma * mu_batch / sigma_batch`` (Jacob et al. 2018, Krishnamoorthi 2018) -- batch norm of the
  rescaled output, one primitive (``bn_fold_correction``: a kernel forward, two backward). After
  ``freeze_bn`` steps the running statistics are used (correction 1, bias
  ``beta - gamma * mu_running / sigma_running``) and no longer updated; evaluation always uses them;
* ``Conv2dQuant`` / ``DenseQuant`` -- fake-quantized weights (per channel, symmetric by default);
* ``ActQuant`` (an activation then an activation fake-quant), ``ReLUQuant``, ``TensorAddQuant``.

Every quant Cell reads a step counter (an int32 scalar Parameter). ``convert_quant_network`` gives the
whole network one shared counter, incremented once per training step; a Cell built on its own makes and
increments its own.
"""
from __future__ import annotations

import numpy as np

from runtime.nn.cell import Cell
from runtime.nn.init import initializer
from runtime.nn.layers import BatchNorm1d, BatchNorm2d, Conv2d, Dense, ReLU, _pair, get_activation
from runtime.nn.parameter import Parameter
from runtime.ops import api as F
from runtime.ops import prims as P
from runtime.ops.quant import bn_fold_correction, fake_quant_perchannel, fake_quant_perlayer, minmax_update


def step_counter() -> Parameter:
    """A fresh step counter (int32 scalar, not trainable)."""
    return Parameter(np.zeros((), np.int32), name="quant_step", requires_grad=False)


class _QuantCell(Cell):
    """Holds the step counter; a Cell that made its own increments it after each training call."""

    def _init_step(self, step):
        self._owns_step = step is None
        self.step = step if step is not None else step_counter()

    def _tick(self):
        if self._owns_step and self.training:
            F.assign(self.step, F.add(self.step, 1))


# ----------------------------------------------------------------------------------------------
# fused float cells
# ----------------------------------------------------------------------------------------------
class _BnAct(Cell):
    """A layer (``self._layer``), an optional BatchNorm, an optional activation."""

    _layer = ""

    def _finish(self, out_channels, has_bn, bn_cls, eps, momentum, activation, dtype):
        self.has_bn = bool(has_bn)
        if has_bn:
            self.batchnorm = bn_cls(out_channels, eps=eps, momentum=momentum, dtype=dtype)
        self.activation = get_activation(activation)
        self.has_act = self.activation is not None

    def extend_repr(self):
        return f"{getattr(self, self._layer).extend_repr()}, has_bn={self.has_bn}, activation={self.activation!r}"

    def construct(self, x):
        x = getattr(self, self._layer)(x)
        if self.has_bn:
            x = self.batchnorm(x)
        if self.has_act:
            x = self.activation(x)
        return x


class Conv2dBnAct(_BnAct):
    """Conv2d + optional BatchNorm2d + optional activation, one Cell (MindSpore's ``nn.Conv2dBnAct``)."""

    _layer = "conv"

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, pad_mode="same", padding=0,
                 has_bias=False, weight_init="default", bias_init="zeros", has_bn=False, momentum=0.9, eps=1e-5,
                 activation=None, dtype=np.float32):
        super().__init__()
        self.conv = Conv2d(in_channels, out_channels, kernel_size, stride, pad_mode, padding, has_bias,
                           weight_init, bias_init, dtype)
        self._finish(out_channels, has_bn, BatchNorm2d, eps, momentum, activation, dtype)


class DenseBnAct(_BnAct):
    """Dense + optional BatchNorm1d + optional activation, one Cell (MindSpore's ``nn.DenseBnAct``)."""

    _layer = "dense"

    def __init__(self, in_channels, out_channels, weight_init="default", bias_init="zeros", has_bias=True,
                 has_bn=False, momentum=0.9, eps=1e-5, activation=None, dtype=np.float32):
        super().__init__()
        self.dense = Dense(in_channels, out_channels, weight_init, bias_init, has_bias, dtype=dtype)
        self._finish(out_channels, has_bn, BatchNorm1d, eps, momentum, activation, dtype)


class TensorAdd(Cell):
    """x1 + x2 as a Cell, so the converter can replace it with ``TensorAddQuant``."""

    def construct(self, x1, x2):
        return F.add(x1, x2)


# ----------------------------------------------------------------------------------------------
# fake quantization
# ----------------------------------------------------------------------------------------------
class FakeQuantWithMinMax(_QuantCell):
    """Observer + fake quantization (MindSpore's ``nn.FakeQuantWithMinMax``)."""

    def __init__(self, min_init=-6, max_init=6, ema=False, ema_decay=0.999, per_channel=False, channel_axis=1,
                 num_channels=1, num_bits=8, symmetric=False, narrow_range=False, quant_delay=0, step=None,
                 dtype=np.float32):
        super().__init__()
        if not 2 <= int(num_bits) <= 8:
            raise ValueError(f"FakeQuantWithMinMax: num_bits must be in 2..8 (int8 storage), got {num_bits}")
        if not 0.0 <= float(ema_decay) < 1.0:
            raise ValueError(f"FakeQuantWithMinMax: ema_decay must be in [0, 1), got {ema_decay}")
        if min_init > max_init:
            raise ValueError(f"FakeQuantWithMinMax: min_init {min_init} > max_init {max_init}")
        self.ema, self.ema_decay = bool(ema), float(ema_decay)
        self.per_channel, self.channel_axis = bool(per_channel), int(channel_axis)
        self.num_channels = int(num_channels) if per_channel else 1
        self.num_bits, self.symmetric, self.narrow_range = int(num_bits), bool(symmetric), bool(narrow_range)
        self.quant_delay = int(quant_delay)
        c = self.num_channels
        self.minq = Parameter(np.full((c,), min_init, dtype), requires_grad=False)
        self.maxq = Parameter(np.full((c,), max_init, dtype), requires_grad=False)
        self._init_step(step)

    def extend_repr(self):
        return (f"num_bits={self.num_bits}, symmetric={self.symmetric}, narrow_range={self.narrow_range}, "
                f"ema={self.ema}, ema_decay={self.ema_decay}, per_channel={self.per_channel}, "
                f"quant_delay={self.quant_delay}")

    def _observed(self, x):
        """(min, max) of this batch: per channel along channel_axis, else over the whole tensor, shape (C,)."""
        axes = tuple(i for i in range(x.ndim) if i != self.channel_axis) if self.per_channel else None
        mx = F.reduce_max(x, axes)
        mn = F.neg(F.reduce_max(F.neg(x), axes))
        shape = (self.num_channels,)
        mn, mx = F.reshape(mn, shape), F.reshape(mx, shape)
        if mn.dtype != self.minq.dtype:
            mn, mx = F.cast(mn, self.minq.dtype), F.cast(mx, self.minq.dtype)
        return mn, mx

    def construct(self, x):
        if self.per_channel:
            self.check(0 <= self.channel_axis < x.ndim and x.shape[self.channel_axis] == self.num_channels,
                       f"expects {self.num_channels} channels on axis {self.channel_axis}, got {tuple(x.shape)}")
        if self.training and x.dtype == self.minq.dtype:
            # one task observes x (min and max in one sweep, the EMA from the second step on); the fake quant
            # uses the new range, and minq / maxq keep it
            c = self.num_channels
            r = minmax_update(x, self.minq, self.maxq, self.step, ema=self.ema, ema_decay=self.ema_decay,
                              channel_axis=self.channel_axis if self.per_channel else None)
            mn, mx = F.slice(r, (0,), (c,)), F.slice(r, (c,), (2 * c,))
            if self.ema:      # without EMA the range is recomputed from x every time
                F.assign(self.minq, mn)
                F.assign(self.maxq, mx)
        elif self.training or not self.ema:
            mn, mx = self._observed(x)
            if self.ema and self.training:
                d = self.ema_decay
                first = F.equal(self.step, 0)
                mn = F.select(first, mn, F.add(F.mul(self.minq, d), F.mul(mn, 1.0 - d)))
                mx = F.select(first, mx, F.add(F.mul(self.maxq, d), F.mul(mx, 1.0 - d)))
                F.assign(self.minq, mn)
                F.assign(self.maxq, mx)
        else:
            mn, mx = self.minq, self.maxq
        kw = dict(num_bits=self.num_bits, narrow_range=self.narrow_range, symmetric=self.symmetric,
                  quant_delay=self.quant_delay, training=self.training)
        if self.per_channel:
            out = fake_quant_perchannel(x, mn, mx, self.step, self.channel_axis, **kw)
        else:
            out = fake_quant_perlayer(x, mn, mx, self.step, **kw)
        self._tick()
        return out


def _weight_fq(out_channels, per_channel, num_bits, symmetric, narrow_range, quant_delay, step, dtype):
    return FakeQuantWithMinMax(ema=False, per_channel=per_channel, channel_axis=0, num_channels=out_channels,
                               num_bits=num_bits, symmetric=symmetric, narrow_range=narrow_range,
                               quant_delay=quant_delay, step=step, dtype=dtype)


def _conv_padding(kernel_size, stride, pad_mode, padding):
    ks, st = _pair(kernel_size), _pair(stride)
    if pad_mode == "same":
        if st != (1, 1) or any(k % 2 == 0 for k in ks):
            raise ValueError("pad_mode='same' is supported for stride 1 and odd kernel sizes; use pad_mode='pad'")
        return ks, st, tuple((k - 1) // 2 for k in ks)
    if pad_mode == "valid":
        return ks, st, (0, 0)
    if pad_mode == "pad":
        return ks, st, _pair(padding)
    raise ValueError(f"pad_mode must be 'same', 'valid' or 'pad', got {pad_mode!r}")


class Conv2dQuant(_QuantCell):
    """Conv2d with fake-quantized weights (MindSpore's ``nn.Conv2dQuant``)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, pad_mode="same", padding=0,
                 has_bias=False, weight_init="default", bias_init="zeros", quant_delay=0, per_channel=True,
                 num_bits=8, symmetric=True, narrow_range=False, step=None, dtype=np.float32):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.padding = _conv_padding(kernel_size, stride, pad_mode, padding)
        self.pad_mode = pad_mode
        self.weight = Parameter(initializer(weight_init, (out_channels, in_channels) + self.kernel_size, dtype))
        self.has_bias = bool(has_bias)
        if has_bias:
            self.bias = Parameter(initializer(bias_init, (out_channels,), dtype))
        self._init_step(step)
        self.fake_quant_weight = _weight_fq(out_channels, per_channel, num_bits, symmetric, narrow_range,
                                            quant_delay, self.step, dtype)

    def extend_repr(self):
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}")

    def construct(self, x):
        self.check(x.ndim == 4 and x.shape[1] == self.in_channels,
                   f"expects input of shape (N, {self.in_channels}, H, W) but got {tuple(x.shape)}")
        y = F.conv2d(x, self.fake_quant_weight(self.weight), self.stride, self.padding)
        if self.has_bias:
            y = F.add(y, F.reshape(self.bias, (self.out_channels, 1, 1)))
        self._tick()
        return y


class Conv2dBnFoldQuant(_QuantCell):
    """Conv2d with BatchNorm folded into its fake-quantized weights (MindSpore's ``Conv2dBatchNormQuant``)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, pad_mode="same", padding=0, eps=1e-5,
                 momentum=0.9, weight_init="default", gamma_init="ones", beta_init="zeros", mean_init="zeros",
                 var_init="ones", quant_delay=0, freeze_bn=100000, fake=True, num_bits=8, per_channel=True,
                 symmetric=True, narrow_range=False, step=None, dtype=np.float32):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.padding = _conv_padding(kernel_size, stride, pad_mode, padding)
        self.pad_mode = pad_mode
        self.eps, self.momentum, self.freeze_bn, self.fake = float(eps), float(momentum), int(freeze_bn), bool(fake)
        c = self.out_channels
        self.weight = Parameter(initializer(weight_init, (c, in_channels) + self.kernel_size, dtype))
        self.gamma = Parameter(initializer(gamma_init, (c,), dtype))
        self.beta = Parameter(initializer(beta_init, (c,), dtype))
        self.moving_mean = Parameter(initializer(mean_init, (c,), dtype), requires_grad=False)
        self.moving_variance = Parameter(initializer(var_init, (c,), dtype), requires_grad=False)
        self._init_step(step)
        self.fake_quant_weight = _weight_fq(c, per_channel, num_bits, symmetric, narrow_range, quant_delay,
                                            self.step, dtype)

    def extend_repr(self):
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, freeze_bn={self.freeze_bn}")

    def _conv(self, x, w):
        return F.conv2d(x, w, self.stride, self.padding)

    def construct(self, x):
        self.check(x.ndim == 4 and x.shape[1] == self.in_channels,
                   f"expects input of shape (N, {self.in_channels}, H, W) but got {tuple(x.shape)}")
        c = self.out_channels
        cshape = (1, c, 1, 1)
        # the running statistics as they are before this step's update (no gradient flows into them)
        std_run = F.sqrt(F.add(self.moving_variance, self.eps))
        w = F.mul(self.weight, F.reshape(F.div(self.gamma, std_run), (c, 1, 1, 1)))
        if self.fake:
            w = self.fake_quant_weight(w)
        y = self._conv(x, w)
        if not self.training:
            bias = F.sub(self.beta, F.div(F.mul(self.gamma, self.moving_mean), std_run))
            return F.add(y, F.reshape(bias, cshape))
        # Batch statistics of the unfolded conv, recovered from the folded one (one convolution, not two:
        # PyTorch's ConvBn2d "approximate" form; MindSpore runs a second conv with the float weights):
        # z = y * k with k = sigma_run / gamma is the unfolded conv, and the corrected output
        #   y * sigma_run / sigma_B + beta - gamma * mu_B / sigma_B  =  gamma (z - mu_B) / sigma_B + beta
        # is batch norm of z (the gradient flows through the batch statistics); after freeze_bn steps
        # y + beta - gamma * mu_run / sigma_run. One primitive (``bn_fold_correction``), switched by the step.
        # (A channel with gamma exactly 0 has y = 0, z = 0 and output beta; dividing by 1 there keeps k finite.)
        k = F.div(std_run, F.select(F.equal(self.gamma, 0.0), F.ones_like(self.gamma), self.gamma))
        bias = F.sub(self.beta, F.div(F.mul(self.gamma, self.moving_mean), std_run))
        out = bn_fold_correction(y, k, self.gamma, self.beta, bias, self.step, self.eps, self.freeze_bn)
        # running statistics of z (mean k mean(y), unbiased variance k^2 var(y)): updated until freeze_bn, then kept
        stats = P.batch_norm_stats(y)
        mean_b = F.mul(F.reshape(F.slice(stats, (0, 0), (1, c)), (c,)), k)
        var_b = F.mul(F.reshape(F.slice(stats, (1, 0), (2, c)), (c,)), F.mul(k, k))
        frozen = F.greater_equal(self.step, self.freeze_bn)
        m = self.momentum
        F.assign(self.moving_mean, F.select(frozen, self.moving_mean,
                                            F.add(F.mul(self.moving_mean, m), F.mul(mean_b, 1.0 - m))))
        F.assign(self.moving_variance, F.select(frozen, self.moving_variance,
                                                F.add(F.mul(self.moving_variance, m), F.mul(var_b, 1.0 - m))))
        self._tick()
        return out


Conv2dBatchNormQuant = Conv2dBnFoldQuant     # MindSpore 0.5's name of the same cell


class DenseQuant(_QuantCell):
    """Dense with fake-quantized weights (MindSpore's ``nn.DenseQuant``)."""

    def __init__(self, in_channels, out_channels, weight_init="default", bias_init="zeros", has_bias=True,
                 activation=None, quant_delay=0, per_channel=True, num_bits=8, symmetric=True, narrow_range=False,
                 step=None, dtype=np.float32):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.weight = Parameter(initializer(weight_init, (out_channels, in_channels), dtype))
        self.has_bias = bool(has_bias)
        if has_bias:
            self.bias = Parameter(initializer(bias_init, (out_channels,), dtype))
        self.activation = get_activation(activation)
        self._init_step(step)
        self.fake_quant_weight = _weight_fq(out_channels, per_channel, num_bits, symmetric, narrow_range,
                                            quant_delay, self.step, dtype)

    def extend_repr(self):
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}"

    def construct(self, x):
        self.check(x.ndim == 2 and x.shape[1] == self.in_channels,
                   f"expects input of shape (N, {self.in_channels}) but got {tuple(x.shape)}")
        y = F.matmul(x, self.fake_quant_weight(self.weight), transpose_b=True)
        if self.has_bias:
            y = F.add(y, self.bias)
        if self.activation is not None:
            y = self.activation(y)
        self._tick()
        return y


def _act_fq(ema_decay, num_bits, symmetric, narrow_range, quant_delay, step, dtype):
    return FakeQuantWithMinMax(ema=True, ema_decay=ema_decay, num_bits=num_bits, symmetric=symmetric,
                               narrow_range=narrow_range, quant_delay=quant_delay, step=step, dtype=dtype)


class ActQuant(_QuantCell):
    """An activation (or none) followed by a per-tensor EMA fake quantization of its output."""

    def __init__(self, activation=None, ema_decay=0.999, num_bits=8, symmetric=False, narrow_range=False,
                 quant_delay=0, step=None, dtype=np.float32):
        super().__init__()
        self.act = get_activation(activation)
        self._init_step(step)
        self.fake_quant_act = _act_fq(ema_decay, num_bits, symmetric, narrow_range, quant_delay, self.step, dtype)

    def extend_repr(self):
        return f"act={self.act!r}, {self.fake_quant_act.extend_repr()}"

    def construct(self, x):
        if self.act is not None:
            x = self.act(x)
        out = self.fake_quant_act(x)
        self._tick()
        return out


class ReLUQuant(ActQuant):
    """ReLU followed by an activation fake quantization (MindSpore's ``nn.ReLUQuant``)."""

    def __init__(self, ema_decay=0.999, num_bits=8, symmetric=False, narrow_range=False, quant_delay=0, step=None,
                 dtype=np.float32):
        super().__init__(ReLU(), ema_decay, num_bits, symmetric, narrow_range, quant_delay, step, dtype)


class TensorAddQuant(_QuantCell):
    """x1 + x2 followed by an activation fake quantization (MindSpore's ``nn.TensorAddQuant``)."""

    def __init__(self, ema_decay=0.999, num_bits=8, symmetric=False, narrow_range=False, quant_delay=0, step=None,
                 dtype=np.float32):
        super().__init__()
        self._init_step(step)
        self.fake_quant_act = _act_fq(ema_decay, num_bits, symmetric, narrow_range, quant_delay, self.step, dtype)

    def construct(self, x1, x2):
        out = self.fake_quant_act(F.add(x1, x2))
        self._tick()
        return out
