"""Layers: Dense, Conv2d, pooling, BatchNorm, LayerNorm, Dropout, Embedding, activations."""
from __future__ import annotations

import numpy as np

from runtime import context
from runtime import random as _random
from runtime.core import Tensor
from runtime.nn.cell import Cell
from runtime.nn.init import initializer
from runtime.nn.parameter import Parameter
from runtime.ops import api as F
from runtime.ops import prims as P


def _pair(v):
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


class ReLU(Cell):
    def construct(self, x):
        return F.relu(x)


class GELU(Cell):
    def construct(self, x):
        return F.gelu(x)


class Tanh(Cell):
    def construct(self, x):
        return F.tanh(x)


class Sigmoid(Cell):
    def construct(self, x):
        return F.sigmoid(x)


class LeakyReLU(Cell):
    def __init__(self, alpha=0.2):
        super().__init__()
        self.alpha = float(alpha)

    def construct(self, x):
        return F.leaky_relu(x, self.alpha)


class ELU(Cell):
    def __init__(self, alpha=1.0):
        super().__init__()
        self.alpha = float(alpha)

    def construct(self, x):
        return F.elu(x, self.alpha)


class Softmax(Cell):
    def __init__(self, axis=-1):
        super().__init__()
        self.axis = axis

    def construct(self, x):
        return F.softmax(x, self.axis)


_ACTIVATIONS = {"relu": ReLU, "gelu": GELU, "tanh": Tanh, "sigmoid": Sigmoid, "softmax": Softmax}


def get_activation(name):
    if name is None or isinstance(name, Cell):
        return name
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; use one of {sorted(_ACTIVATIONS)}") from None


class Flatten(Cell):
    def construct(self, x):
        return F.reshape(x, (x.shape[0], -1))


class SequentialCell(Cell):
    def __init__(self, *cells):
        super().__init__()
        if len(cells) == 1 and isinstance(cells[0], (list, tuple)):
            cells = tuple(cells[0])
        for i, c in enumerate(cells):
            if not isinstance(c, Cell):
                raise TypeError(f"SequentialCell: item {i} is {type(c).__name__}, not a Cell")
            setattr(self, str(i), c)
        self._order = [str(i) for i in range(len(cells))]

    def __getitem__(self, i):
        return self._cells[self._order[i]]

    def __len__(self):
        return len(self._order)

    def construct(self, x):
        for name in self._order:
            x = self._cells[name](x)
        return x


class Dense(Cell):
    """y = x W^T + b, W stored (out_channels, in_channels) as in MindSpore."""

    def __init__(self, in_channels, out_channels, weight_init="default", bias_init="zeros", has_bias=True,
                 activation=None, dtype=np.float32):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.weight = Parameter(initializer(weight_init, (out_channels, in_channels), dtype))
        self.has_bias = has_bias
        if has_bias:
            if bias_init == "default":
                lim = 1.0 / np.sqrt(in_channels)
                b = _random.generator().uniform(-lim, lim, out_channels).astype(dtype)
            else:
                b = initializer(bias_init, (out_channels,), dtype)
            self.bias = Parameter(b)
        self.activation = get_activation(activation)

    def extend_repr(self):
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}"

    def construct(self, x):
        self.check(x.ndim >= 2 and x.shape[-1] == self.in_channels,
                   f"expects input of shape (*, {self.in_channels}) but got {tuple(x.shape)}")
        lead = x.shape[:-1]
        if x.ndim > 2:
            x = F.reshape(x, (-1, self.in_channels))
        y = F.matmul(x, self.weight, transpose_b=True)
        if self.has_bias:
            y = F.add(y, self.bias)
        if len(lead) > 1:
            y = F.reshape(y, lead + (self.out_channels,))
        if self.activation is not None:
            y = self.activation(y)
        return y


class Conv2d(Cell):
    """2-D convolution over NCHW input; weight (out, in, kh, kw). pad_mode: same | valid | pad."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, pad_mode="same", padding=0,
                 has_bias=False, weight_init="default", bias_init="zeros", dtype=np.float32):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        if pad_mode not in ("same", "valid", "pad"):
            raise ValueError(f"Conv2d: pad_mode must be 'same', 'valid' or 'pad', got {pad_mode!r}")
        self.pad_mode = pad_mode
        if pad_mode == "same":
            if self.stride != (1, 1) or any(k % 2 == 0 for k in self.kernel_size):
                raise ValueError("Conv2d: pad_mode='same' is supported for stride 1 and odd kernel sizes; "
                                 "use pad_mode='pad' with an explicit padding otherwise")
            self.padding = tuple((k - 1) // 2 for k in self.kernel_size)
        elif pad_mode == "valid":
            self.padding = (0, 0)
        else:
            self.padding = _pair(padding)
        self.weight = Parameter(initializer(weight_init, (out_channels, in_channels) + self.kernel_size, dtype))
        self.has_bias = has_bias
        if has_bias:
            self.bias = Parameter(initializer(bias_init, (out_channels,), dtype))

    def extend_repr(self):
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, pad_mode={self.pad_mode!r}")

    def construct(self, x):
        self.check(x.ndim == 4 and x.shape[1] == self.in_channels,
                   f"expects input of shape (N, {self.in_channels}, H, W) but got {tuple(x.shape)}")
        y = F.conv2d(x, self.weight, self.stride, self.padding)
        if self.has_bias:
            y = F.add(y, F.reshape(self.bias, (self.out_channels, 1, 1)))
        return y


class _Pool(Cell):
    def __init__(self, kernel_size=1, stride=1, pad_mode="valid"):
        super().__init__()
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        if pad_mode not in ("valid", "same"):
            raise ValueError(f"{type(self).__name__}: pad_mode must be 'valid' or 'same', got {pad_mode!r}")
        self.pad_mode = pad_mode
        self.padding = (0, 0) if pad_mode == "valid" else tuple((k - 1) // 2 for k in self.kernel_size)

    def extend_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, pad_mode={self.pad_mode!r}"

    def construct(self, x):
        self.check(x.ndim == 4, f"expects an (N, C, H, W) input but got {tuple(x.shape)}")
        return self._pool(x, self.kernel_size, self.stride, self.padding)


class MaxPool2d(_Pool):
    _pool = staticmethod(F.max_pool)


class AvgPool2d(_Pool):
    _pool = staticmethod(F.avg_pool)


class _BatchNorm(Cell):
    """Batch normalisation. Moving stats: moving = momentum*moving + (1-momentum)*batch (MindSpore)."""

    _ndim = 0

    def __init__(self, num_features, eps=1e-5, momentum=0.9, affine=True, gamma_init="ones",
                 beta_init="zeros", moving_mean_init="zeros", moving_var_init="ones", dtype=np.float32):
        super().__init__()
        self.num_features, self.eps, self.momentum = int(num_features), float(eps), float(momentum)
        self.gamma = Parameter(initializer(gamma_init, (num_features,), dtype), requires_grad=affine)
        self.beta = Parameter(initializer(beta_init, (num_features,), dtype), requires_grad=affine)
        self.moving_mean = Parameter(initializer(moving_mean_init, (num_features,), dtype), requires_grad=False)
        self.moving_variance = Parameter(initializer(moving_var_init, (num_features,), dtype),
                                         requires_grad=False)

    def extend_repr(self):
        return f"num_features={self.num_features}, eps={self.eps}, momentum={self.momentum}"

    def _bshape(self, x):
        return (1, self.num_features) + (1,) * (x.ndim - 2)

    def construct(self, x):
        self.check(x.ndim == self._ndim and x.shape[1] == self.num_features,
                   f"expects a {self._ndim}-d input with {self.num_features} channels on axis 1 "
                   f"but got {tuple(x.shape)}")
        bs = self._bshape(x)
        if self.training:
            # one primitive each way (Cython forward and backward, statistics in double); the moving
            # statistics from one more pass over x (mean and unbiased variance), updated in place
            stats = P.batch_norm_stats(x)
            F.assign(self.moving_mean, P.batch_norm_moving(self.moving_mean, stats, 0, self.momentum))
            F.assign(self.moving_variance, P.batch_norm_moving(self.moving_variance, stats, 1, self.momentum))
            return P.batch_norm(x, self.gamma, self.beta, self.eps)
        xhat = F.mul(F.sub(x, F.reshape(self.moving_mean, bs)),
                     F.reshape(F.rsqrt(F.add(self.moving_variance, self.eps)), bs))
        return F.add(F.mul(xhat, F.reshape(self.gamma, bs)), F.reshape(self.beta, bs))


class BatchNorm1d(_BatchNorm):
    _ndim = 2


class BatchNorm2d(_BatchNorm):
    _ndim = 4


class LayerNorm(Cell):
    """Normalises over the trailing ``normalized_shape`` axes (given as a tuple, MindSpore-style)."""

    def __init__(self, normalized_shape, epsilon=1e-5, gamma_init="ones", beta_init="zeros", dtype=np.float32):
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(int(s) for s in normalized_shape)
        self.epsilon = float(epsilon)
        d = int(np.prod(self.normalized_shape))
        self.gamma = Parameter(initializer(gamma_init, (d,), dtype))
        self.beta = Parameter(initializer(beta_init, (d,), dtype))

    def extend_repr(self):
        return f"normalized_shape={self.normalized_shape}"

    def construct(self, x):
        k = len(self.normalized_shape)
        self.check(tuple(x.shape[-k:]) == self.normalized_shape,
                   f"expects input ending in {self.normalized_shape} but got {tuple(x.shape)}")
        if k == 1:
            return F.layer_norm(x, self.gamma, self.beta, self.epsilon)
        shape = x.shape
        flat = F.reshape(x, tuple(shape[:-k]) + (int(np.prod(self.normalized_shape)),))
        return F.reshape(F.layer_norm(flat, self.gamma, self.beta, self.epsilon), shape)


class Dropout(Cell):
    """Drops units with probability 1 - keep_prob in training (seeded, scaled by 1/keep_prob)."""

    def __init__(self, keep_prob=0.5, seed=None):
        super().__init__()
        if not 0.0 < keep_prob <= 1.0:
            raise ValueError(f"Dropout: keep_prob must be in (0, 1], got {keep_prob}")
        self.keep_prob = float(keep_prob)
        self.rng = _random.generator(seed, "dropout")

    def extend_repr(self):
        return f"keep_prob={self.keep_prob}"

    def construct(self, x):
        if not self.training or self.keep_prob >= 1.0:
            return x
        return F.dropout(x, self.keep_prob, self.rng)


class Embedding(Cell):
    """A lookup table (vocab_size, embedding_size); input: integer ids of any shape."""

    def __init__(self, vocab_size, embedding_size, embedding_table="normal", dtype=np.float32):
        super().__init__()
        self.vocab_size, self.embedding_size = int(vocab_size), int(embedding_size)
        self.embedding_table = Parameter(initializer(embedding_table, (vocab_size, embedding_size), dtype))

    def extend_repr(self):
        return f"vocab_size={self.vocab_size}, embedding_size={self.embedding_size}"

    def construct(self, ids):
        self.check(ids.dtype.kind in "iu", f"expects integer ids but got dtype {ids.dtype}")
        return F.gather(self.embedding_table, ids)


def tensor(x, dtype=None) -> Tensor:
    return Tensor(x, dtype)
