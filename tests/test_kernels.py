"""Tests for runtime/_kernels.pyx against straightforward numpy references.

Build first:  python setup.py build_ext --inplace
"""
import math
import os
import sys

import numpy as np
import pytest

# make `runtime` importable when pytest is started without `python -m` from the repo root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runtime import _kernels as K  # noqa: E402  (build: python setup.py build_ext --inplace)

TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-12)}
DTYPES = [np.float32, np.float64]
IDTYPES = [np.int32, np.int64]


def close(got, ref, dtype):
    """Compare a kernel result (dtype) with a float64 reference at the dtype's tolerance."""
    assert got.dtype == np.dtype(dtype), (got.dtype, dtype)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    np.testing.assert_allclose(got.astype(np.float64), ref, **TOL[dtype])


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ----------------------------------------------------------------------------- references

C_GELU = math.sqrt(2.0 / math.pi)


def ref_gelu(x):
    return 0.5 * x * (1.0 + np.tanh(C_GELU * (x + 0.044715 * x ** 3)))


def ref_gelu_grad(x):
    t = np.tanh(C_GELU * (x + 0.044715 * x ** 3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * C_GELU * (1 + 3 * 0.044715 * x * x)


def ref_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ref_log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def ref_layernorm(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def ref_layernorm_bwd(x, g, dy, eps):
    D = x.shape[-1]
    mu = x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (x - mu) * rstd
    gy = dy * g
    dx = rstd * (gy - gy.sum(-1, keepdims=True) / D - xhat * (gy * xhat).sum(-1, keepdims=True) / D)
    return dx, np.stack([(dy * xhat).sum(0), dy.sum(0)])


def out_size(n, k, s, p):
    return (n + 2 * p - k) // s + 1


def ref_im2col(x, kh, kw, sh, sw, ph, pw):
    N, C, H, W = x.shape
    OH, OW = out_size(H, kh, sh, ph), out_size(W, kw, sw, pw)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    cols = np.empty((N, C, kh, kw, OH, OW), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i:i + sh * (OH - 1) + 1:sh, j:j + sw * (OW - 1) + 1:sw]
    return cols.reshape(N, C * kh * kw, OH * OW)


def ref_col2im(cols, N, C, H, W, kh, kw, sh, sw, ph, pw):
    OH, OW = out_size(H, kh, sh, ph), out_size(W, kw, sw, pw)
    c = cols.reshape(N, C, kh, kw, OH, OW).astype(np.float64)
    xp = np.zeros((N, C, H + 2 * ph, W + 2 * pw))
    for i in range(kh):
        for j in range(kw):
            xp[:, :, i:i + sh * (OH - 1) + 1:sh, j:j + sw * (OW - 1) + 1:sw] += c[:, :, i, j]
    return xp[:, :, ph:ph + H, pw:pw + W]


def _windows(xp, kh, kw, sh, sw, OH, OW):
    """(N, C, OH, OW, kh*kw) windows of a padded array, row-major window order."""
    N, C = xp.shape[:2]
    win = np.empty((N, C, OH, OW, kh, kw), dtype=xp.dtype)
    for i in range(kh):
        for j in range(kw):
            win[..., i, j] = xp[:, :, i:i + sh * (OH - 1) + 1:sh, j:j + sw * (OW - 1) + 1:sw]
    return win.reshape(N, C, OH, OW, kh * kw)


def ref_pool(x, kh, kw, sh, sw, ph, pw, kind):
    N, C, H, W = x.shape
    OH, OW = out_size(H, kh, sh, ph), out_size(W, kw, sw, pw)
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)
    win = _windows(xp, kh, kw, sh, sw, OH, OW)
    return win.max(-1) if kind == "max" else win.sum(-1) / (kh * kw)


def ref_pool_bwd(x, dy, kh, kw, sh, sw, ph, pw, kind):
    N, C, H, W = x.shape
    OH, OW = dy.shape[2:]
    dxp = np.zeros((N, C, H + 2 * ph, W + 2 * pw))
    dy = dy.astype(np.float64)
    if kind == "max":
        xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)),
                    constant_values=-np.inf)
        arg = _windows(xp, kh, kw, sh, sw, OH, OW).argmax(-1)  # first max
        n_i, c_i, oh_i, ow_i = np.indices((N, C, OH, OW))
        ih = oh_i * sh + arg // kw
        iw = ow_i * sw + arg % kw
        np.add.at(dxp, (n_i, c_i, ih, iw), dy)
    else:
        for i in range(kh):
            for j in range(kw):
                dxp[:, :, i:i + sh * (OH - 1) + 1:sh, j:j + sw * (OW - 1) + 1:sw] += dy / (kh * kw)
    return dxp[:, :, ph:ph + H, pw:pw + W]


# ----------------------------------------------------------------------------- 1. GELU

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5, 7), (301, 257)])
def test_gelu(rng, dtype, shape):
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    x64 = x.astype(np.float64)
    close(K.gelu_fwd(x), ref_gelu(x64), dtype)
    close(K.gelu_bwd(x, dy), dy * ref_gelu_grad(x64), dtype)


def test_gelu_extremes():
    x = np.array([-1e4, -50, -10, -3, -1e-30, 0.0, 1e-30, 3, 10, 50, 1e4, np.nan])
    for dtype in DTYPES:
        y = K.gelu_fwd(x.astype(dtype))
        g = K.gelu_bwd(x.astype(dtype), np.ones_like(x, dtype=dtype))
        np.testing.assert_allclose(y[:-1], ref_gelu(x[:-1]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g[:-1], ref_gelu_grad(x[:-1]), rtol=1e-5, atol=1e-6)
        assert np.isnan(y[-1]) and np.isnan(g[-1])


def test_gelu_errors():
    with pytest.raises(ValueError, match="gelu_bwd"):
        K.gelu_bwd(np.zeros((3, 4)), np.zeros((4, 3)))
    with pytest.raises(TypeError, match="gelu_fwd"):
        K.gelu_fwd(np.zeros(3, dtype=np.int64))


def test_noncontiguous_and_mixed_dtype(rng):
    x = rng.standard_normal((20, 30))
    xt = x.T  # F-contiguous view
    np.testing.assert_allclose(K.gelu_fwd(xt), ref_gelu(xt), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(K.softmax_fwd(x[:, ::2]), ref_softmax(x[:, ::2]), rtol=1e-12)
    # secondary inputs are cast to the dtype of the first float argument
    g = K.gelu_bwd(x.astype(np.float32), np.ones_like(x))
    assert g.dtype == np.float32
    # read-only input
    xr = x.copy()
    xr.flags.writeable = False
    np.testing.assert_allclose(K.softmax_fwd(xr), ref_softmax(x), rtol=1e-12)


# ----------------------------------------------------------------------------- 2. softmax

SM_SHAPES = [(1, 1), (3, 7), (5, 1000), (200, 333)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SM_SHAPES)
def test_softmax(rng, dtype, shape):
    x = (rng.standard_normal(shape) * 4 + 10).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    y = K.softmax_fwd(x)
    close(y, ref_softmax(x64), dtype)
    y64 = y.astype(np.float64)
    close(K.softmax_bwd(y, dy), y64 * (dy64 - (dy64 * y64).sum(-1, keepdims=True)), dtype)

    ly = K.log_softmax_fwd(x)
    close(ly, ref_log_softmax(x64), dtype)
    ly64 = ly.astype(np.float64)
    close(K.log_softmax_bwd(ly, dy), dy64 - np.exp(ly64) * dy64.sum(-1, keepdims=True), dtype)


def test_softmax_extremes():
    x = np.array([[1000.0, 0.0, -1000.0], [-np.inf, 0.0, 1.0], [-1e30, -1e30, -1e30]])
    for dtype in DTYPES:
        xd = x.astype(dtype)
        np.testing.assert_allclose(K.softmax_fwd(xd), ref_softmax(x), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(K.log_softmax_fwd(xd)[:, 1:], ref_log_softmax(x)[:, 1:],
                                   rtol=1e-6)


def test_xent_extremes():
    # huge / tiny logits must not lose the log-sum-exp term or overflow
    x = np.array([[1e4, 1e4 + 1.0, 1e4 - 2.0], [-1e30, -1e30, -1e30], [0.0, -np.inf, 5.0]])
    lab = np.array([1, 2, 0])
    t = np.array([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0], [0.5, 0.0, 0.5]])
    ls = ref_log_softmax(x)
    ls_t = np.where(t > 0, ls, 0.0)  # 0 * -inf counts as 0 here
    for dtype in DTYPES:
        xd = x.astype(dtype)
        np.testing.assert_allclose(K.softmax_xent_sparse_fwd(xd, lab), -ls[np.arange(3), lab], rtol=1e-6)
        td = t.astype(dtype)
        td[2, 1] = 0.0
        got = K.softmax_xent_dense_fwd(xd[:2], td[:2])
        np.testing.assert_allclose(got, -(t[:2] * ls_t[:2]).sum(1), rtol=1e-6)
        g = K.softmax_xent_sparse_bwd(xd, lab, np.ones(3))
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g.sum(1), 0, atol=1e-6)


def test_index_dtypes(rng):
    table = rng.standard_normal((9, 4))
    ref = table[[1, 8, 1, 0]]
    for idx in (np.array([1, 8, 1, 0], dtype=np.uint8), np.array([1, 8, 1, 0], dtype=np.int16),
                np.array([1, 8, 1, 0], dtype=np.longlong), [1, 8, 1, 0],
                np.array([1, 1, 8, 8, 1, 1, 0, 0], dtype=np.int32)[::2]):  # non-contiguous
        np.testing.assert_array_equal(K.embedding_gather(table, idx), ref)
    with pytest.raises(TypeError, match="embedding_gather"):
        K.embedding_gather(table, np.array([1.0, 2.0]))
    assert K.embedding_gather(table, np.zeros(0, np.int32)).shape == (0, 4)


def test_softmax_errors():
    with pytest.raises(ValueError, match=r"softmax_fwd.*\(2, 3, 4\)"):
        K.softmax_fwd(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="softmax_bwd"):
        K.softmax_bwd(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="log_softmax_bwd"):
        K.log_softmax_bwd(np.zeros((2, 3)), np.zeros((3, 3)))
    assert K.softmax_fwd(np.zeros((0, 5), np.float32)).shape == (0, 5)


# ----------------------------------------------------------------------------- 3. cross entropy

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("itype", IDTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (4, 9), (77, 1000)])
def test_xent_sparse(rng, dtype, itype, shape):
    N, C = shape
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    lab = rng.integers(0, C, N).astype(itype)
    dl = rng.standard_normal(N).astype(dtype)
    x64 = x.astype(np.float64)
    ls = ref_log_softmax(x64)
    close(K.softmax_xent_sparse_fwd(x, lab), -ls[np.arange(N), lab], dtype)
    onehot = np.zeros((N, C))
    onehot[np.arange(N), lab] = 1
    close(K.softmax_xent_sparse_bwd(x, lab, dl), (np.exp(ls) - onehot) * dl[:, None], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (4, 9), (77, 1000)])
def test_xent_dense(rng, dtype, shape):
    N, C = shape
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    t = rng.random(shape)
    t[: N // 2] /= t[: N // 2].sum(-1, keepdims=True)  # half proper distributions, half not
    t = t.astype(dtype)
    dl = rng.standard_normal(N).astype(dtype)
    x64, t64 = x.astype(np.float64), t.astype(np.float64)
    close(K.softmax_xent_dense_fwd(x, t), -(t64 * ref_log_softmax(x64)).sum(-1), dtype)
    ref = (ref_softmax(x64) * t64.sum(-1, keepdims=True) - t64) * dl[:, None]
    close(K.softmax_xent_dense_bwd(x, t, dl), ref, dtype)


def test_xent_errors():
    x = np.zeros((3, 5))
    for bad in (5, -1):
        lab = np.array([0, bad, 1])
        with pytest.raises(IndexError, match=rf"softmax_xent_sparse_fwd.*{bad}.*5"):
            K.softmax_xent_sparse_fwd(x, lab)
        with pytest.raises(IndexError, match=rf"softmax_xent_sparse_bwd.*{bad}.*5"):
            K.softmax_xent_sparse_bwd(x, lab, np.ones(3))
    with pytest.raises(ValueError, match="softmax_xent_sparse_fwd"):
        K.softmax_xent_sparse_fwd(x, np.array([0, 1]))
    with pytest.raises(ValueError, match="softmax_xent_sparse_bwd"):
        K.softmax_xent_sparse_bwd(x, np.array([0, 1, 2]), np.ones(4))
    with pytest.raises(ValueError, match="softmax_xent_dense_fwd"):
        K.softmax_xent_dense_fwd(x, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="softmax_xent_dense_bwd"):
        K.softmax_xent_dense_bwd(x, np.zeros((3, 5)), np.ones(2))
    with pytest.raises(TypeError, match="labels"):
        K.softmax_xent_sparse_fwd(x, np.zeros(3))


# ----------------------------------------------------------------------------- 4. LayerNorm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (3, 64), (97, 769)])
def test_layernorm(rng, dtype, shape):
    N, D = shape
    eps = 1e-5
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    g = rng.standard_normal(D).astype(dtype)
    b = rng.standard_normal(D).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    x64, g64, b64, dy64 = (a.astype(np.float64) for a in (x, g, b, dy))
    close(K.layernorm_fwd(x, g, b, eps), ref_layernorm(x64, g64, b64, eps), dtype)
    dx_ref, dp_ref = ref_layernorm_bwd(x64, g64, dy64, eps)
    close(K.layernorm_bwd(x, g, dy, eps), dx_ref, dtype)
    close(K.layernorm_bwd_params(x, dy, eps), dp_ref, dtype)


def test_layernorm_errors():
    x = np.zeros((4, 6))
    with pytest.raises(ValueError, match=r"layernorm_fwd.*gamma.*\(5,\)"):
        K.layernorm_fwd(x, np.ones(5), np.zeros(6), 1e-5)
    with pytest.raises(ValueError, match=r"layernorm_fwd.*beta"):
        K.layernorm_fwd(x, np.ones(6), np.zeros(7), 1e-5)
    with pytest.raises(ValueError, match="layernorm_fwd"):
        K.layernorm_fwd(np.zeros(6), np.ones(6), np.zeros(6), 1e-5)
    with pytest.raises(ValueError, match="layernorm_bwd"):
        K.layernorm_bwd(x, np.ones(6), np.zeros((4, 5)), 1e-5)
    with pytest.raises(ValueError, match="layernorm_bwd_params"):
        K.layernorm_bwd_params(x, np.zeros((3, 6)), 1e-5)
    assert K.layernorm_bwd_params(np.zeros((0, 6)), np.zeros((0, 6)), 1e-5).shape == (2, 6)


# ----------------------------------------------------------------------------- 4b. batch norm

def ref_bn(x, g, b, dy, eps):
    """float64 reference: forward, dx, (dgamma, dbeta), (mean, unbiased var) over every axis but 1."""
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    ax = tuple(i for i in range(x.ndim) if i != 1)
    bs = [1] * x.ndim
    bs[1] = -1
    g, b = g.astype(np.float64).reshape(bs), b.astype(np.float64).reshape(bs)
    m, v = x.mean(ax, keepdims=True), x.var(ax, keepdims=True)
    r = 1.0 / np.sqrt(v + eps)
    xh = (x - m) * r
    dx = g * r * (dy - dy.mean(ax, keepdims=True) - xh * (dy * xh).mean(ax, keepdims=True))
    n = x.size // x.shape[1]
    return (xh * g + b, dx, np.stack([(dy * xh).sum(ax), dy.sum(ax)]),
            np.stack([m.ravel(), v.ravel() * (n / (n - 1) if n > 1 else 1.0)]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (2, 3, 5), (5, 4, 3, 2), (64, 16, 8, 8), (1, 2, 1, 1)])
def test_batchnorm(rng, dtype, shape):
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    c = shape[1]
    g, b = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y, dx, gp, st = ref_bn(x, g, b, dy, 1e-3)
    tol = dict(rtol=2e-4, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-10)
    for got, ref in ((K.batchnorm_fwd(x, g, b, 1e-3), y), (K.batchnorm_bwd(x, g, dy, 1e-3), dx),
                     (K.batchnorm_bwd_params(x, dy, 1e-3), gp), (K.batchnorm_stats(x), st)):
        assert got.dtype == dtype and got.shape == ref.shape
        np.testing.assert_allclose(got.astype(np.float64), ref, **tol)


def test_batchnorm_errors():
    x = np.zeros((4, 3, 2, 2))
    with pytest.raises(ValueError, match=r"batchnorm_fwd: gamma must have shape \(3,\)"):
        K.batchnorm_fwd(x, np.ones(4), np.zeros(3), 1e-5)
    with pytest.raises(ValueError, match="batchnorm_fwd: x must be"):
        K.batchnorm_fwd(np.zeros(3), np.ones(3), np.zeros(3), 1e-5)
    with pytest.raises(ValueError, match="batchnorm_bwd: x and dy"):
        K.batchnorm_bwd(x, np.ones(3), np.zeros((4, 3, 2, 1)), 1e-5)
    with pytest.raises(ValueError, match="eps"):
        K.batchnorm_bwd_params(x, x, -1.0)
    with pytest.raises(TypeError, match="batchnorm_stats"):
        K.batchnorm_stats(np.zeros((2, 3), dtype=np.int64))
    assert K.batchnorm_stats(np.zeros((0, 3))).shape == (2, 3)


# ----------------------------------------------------------------------------- 5. im2col

CONV_CFGS = [
    # N, C, H, W, kh, kw, sh, sw, ph, pw
    (1, 1, 1, 1, 1, 1, 1, 1, 0, 0),
    (2, 3, 7, 5, 3, 3, 1, 1, 1, 1),
    (2, 2, 9, 11, 3, 2, 2, 3, 1, 0),
    (1, 4, 8, 8, 1, 1, 2, 2, 0, 0),
    (3, 2, 6, 7, 5, 4, 2, 1, 2, 3),
    (1, 2, 4, 3, 2, 2, 1, 1, 3, 2),   # padding larger than kernel: all-zero rows/cols
    (2, 1, 3, 3, 3, 3, 3, 3, 0, 0),
    (4, 16, 17, 19, 3, 3, 1, 1, 1, 1),  # big enough for the threaded path
    # stride 1 with OW == W: the one-copy-per-tap path (OH != H, rows wholly in the padding, 1-wide planes)
    (2, 3, 6, 5, 5, 3, 1, 1, 1, 1),
    (1, 2, 3, 4, 3, 5, 1, 1, 3, 2),
    (2, 1, 5, 1, 3, 1, 1, 1, 1, 0),
    (64, 16, 4, 4, 3, 3, 1, 1, 1, 1),   # the digits CNN's conv2
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", CONV_CFGS)
def test_im2col_col2im(rng, dtype, cfg):
    N, C, H, W, kh, kw, sh, sw, ph, pw = cfg
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    cols = K.im2col(x, kh, kw, sh, sw, ph, pw)
    ref = ref_im2col(x, kh, kw, sh, sw, ph, pw)
    assert cols.dtype == dtype
    np.testing.assert_array_equal(cols, ref)
    c = rng.standard_normal(ref.shape).astype(dtype)
    close(K.col2im(c, N, C, H, W, kh, kw, sh, sw, ph, pw),
          ref_col2im(c, N, C, H, W, kh, kw, sh, sw, ph, pw), dtype)


@pytest.mark.parametrize("cfg", CONV_CFGS)
def test_im2col_adjoint(rng, cfg):
    N, C, H, W, kh, kw, sh, sw, ph, pw = cfg
    x = rng.standard_normal((N, C, H, W))
    cols = K.im2col(x, kh, kw, sh, sw, ph, pw)
    c = rng.standard_normal(cols.shape)
    lhs = np.vdot(cols, c)
    rhs = np.vdot(x, K.col2im(c, N, C, H, W, kh, kw, sh, sw, ph, pw))
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", CONV_CFGS)
def test_im2col_batch_columns_layout(rng, dtype, cfg):
    """batch_cols: (C*kh*kw, N*L), the per-sample matrices side by side; col2im reads it back the same way."""
    N, C, H, W, kh, kw, sh, sw, ph, pw = cfg
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    per_sample = K.im2col(x, kh, kw, sh, sw, ph, pw)
    cols = K.im2col(x, kh, kw, sh, sw, ph, pw, True)
    np.testing.assert_array_equal(cols, per_sample.transpose(1, 0, 2).reshape(per_sample.shape[1], -1))
    c = rng.standard_normal(per_sample.shape).astype(dtype)
    np.testing.assert_array_equal(K.col2im(c.transpose(1, 0, 2).reshape(c.shape[1], -1).copy(), N, C, H, W,
                                           kh, kw, sh, sw, ph, pw, True),
                                  K.col2im(c, N, C, H, W, kh, kw, sh, sw, ph, pw))
    with pytest.raises(ValueError, match="col2im: cols must have shape"):
        K.col2im(c, N, C, H, W, kh, kw, sh, sw, ph, pw, True)


def test_im2col_errors():
    x = np.zeros((1, 2, 5, 5))
    with pytest.raises(ValueError, match="im2col"):
        K.im2col(np.zeros((2, 5, 5)), 3, 3, 1, 1, 0, 0)
    with pytest.raises(ValueError, match="im2col"):
        K.im2col(x, 7, 3, 1, 1, 0, 0)
    with pytest.raises(ValueError, match="im2col"):
        K.im2col(x, 3, 3, 0, 1, 0, 0)
    with pytest.raises(ValueError, match="im2col"):
        K.im2col(x, 3, 3, 1, 1, -1, 0)
    with pytest.raises(ValueError, match=r"col2im.*\(1, 18, 9\)"):
        K.col2im(np.zeros((1, 18, 10)), 1, 2, 5, 5, 3, 3, 1, 1, 0, 0)


# ----------------------------------------------------------------------------- 6. pooling

POOL_CFGS = [
    # N, C, H, W, kh, kw, sh, sw, ph, pw
    (1, 1, 1, 1, 1, 1, 1, 1, 0, 0),
    (2, 3, 8, 8, 2, 2, 2, 2, 0, 0),
    (2, 2, 7, 9, 3, 3, 2, 2, 1, 1),
    (1, 3, 6, 5, 3, 2, 1, 1, 1, 1),   # overlapping windows
    (2, 2, 9, 7, 4, 3, 3, 2, 2, 1),
    (3, 4, 5, 6, 2, 3, 1, 2, 1, 0),
    (4, 32, 21, 23, 3, 3, 2, 2, 1, 1),  # threaded path
    (2, 3, 9, 7, 2, 2, 2, 2, 0, 0),     # the 2x2 / stride 2 fast path, odd sizes (last row / column uncovered)
    (8, 32, 22, 24, 2, 2, 2, 2, 0, 0),  # the 2x2 fast path, threaded
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", POOL_CFGS)
def test_pool(rng, dtype, cfg):
    N, C, H, W, kh, kw, sh, sw, ph, pw = cfg
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    if H * W > 4:  # plant ties so that "first max" matters
        x[:, :, 1, 1] = x[:, :, 1, 2] = x[:, :, 2, 1] = 5
    OH, OW = out_size(H, kh, sh, ph), out_size(W, kw, sw, pw)
    dy = rng.standard_normal((N, C, OH, OW)).astype(dtype)

    close(K.maxpool2d_fwd(x, kh, kw, sh, sw, ph, pw), ref_pool(x, kh, kw, sh, sw, ph, pw, "max"), dtype)
    close(K.maxpool2d_bwd(x, dy, kh, kw, sh, sw, ph, pw),
          ref_pool_bwd(x, dy, kh, kw, sh, sw, ph, pw, "max"), dtype)
    close(K.avgpool2d_fwd(x, kh, kw, sh, sw, ph, pw), ref_pool(x, kh, kw, sh, sw, ph, pw, "avg"), dtype)
    close(K.avgpool2d_bwd(dy, N, C, H, W, kh, kw, sh, sw, ph, pw),
          ref_pool_bwd(x, dy, kh, kw, sh, sw, ph, pw, "avg"), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_maxpool_2x2_nan_and_ties_like_the_general_path(dtype):
    """The 2x2 / stride-2 fast path keeps the general path's rule: the first max of the window in row-major
    order gets the gradient and a NaN wins (the first NaN)."""
    x = np.array([[[[1, 3, 3, 0], [3, 2, np.nan, 1], [0, np.nan, 5, 5], [np.nan, 1, 5, 4]]]], dtype=dtype)
    dy = np.array([[[[10, 20], [30, 40]]]], dtype=dtype)
    y = K.maxpool2d_fwd(x, 2, 2, 2, 2, 0, 0)
    np.testing.assert_array_equal(y, np.array([[[[3, np.nan], [np.nan, 5]]]], dtype=dtype))
    dx = K.maxpool2d_bwd(x, dy, 2, 2, 2, 2, 0, 0)
    expect = np.zeros_like(x)
    expect[0, 0, 0, 1] = 10   # first of the tied 3s
    expect[0, 0, 1, 2] = 20   # the NaN
    expect[0, 0, 2, 1] = 30   # the first NaN
    expect[0, 0, 2, 2] = 40   # first of the tied 5s
    np.testing.assert_array_equal(dx, expect)


def test_pool_errors():
    x = np.zeros((1, 2, 5, 5))
    with pytest.raises(ValueError, match="maxpool2d_fwd"):
        K.maxpool2d_fwd(np.zeros((5, 5)), 2, 2, 2, 2, 0, 0)
    with pytest.raises(ValueError, match="avgpool2d_fwd"):
        K.avgpool2d_fwd(x, 8, 2, 2, 2, 0, 0)
    with pytest.raises(ValueError, match=r"maxpool2d_bwd.*\(1, 2, 2, 2\)"):
        K.maxpool2d_bwd(x, np.zeros((1, 2, 3, 3)), 2, 2, 2, 2, 0, 0)
    with pytest.raises(ValueError, match="avgpool2d_bwd"):
        K.avgpool2d_bwd(np.zeros((1, 2, 3, 3)), 1, 2, 5, 5, 2, 2, 2, 2, 0, 0)


# ----------------------------------------------------------------------------- 7. embedding

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("itype", IDTYPES)
@pytest.mark.parametrize("V,D,n", [(1, 1, 1), (10, 7, 25), (50, 129, 300), (1000, 64, 5000)])
def test_embedding(rng, dtype, itype, V, D, n):
    table = rng.standard_normal((V, D)).astype(dtype)
    idx = rng.integers(0, V, n).astype(itype)
    idx[: min(n, 3)] = idx[0]  # guaranteed duplicates
    rows = rng.standard_normal((n, D)).astype(dtype)

    np.testing.assert_array_equal(K.embedding_gather(table, idx), table[idx])

    dense = np.zeros((V, D))
    np.add.at(dense, idx, rows.astype(np.float64))
    close(K.embedding_scatter_add(idx, rows, V), dense, dtype)

    uniq, summed = K.segment_sum_rows(idx, rows)
    assert uniq.dtype == np.int64
    np.testing.assert_array_equal(uniq, np.unique(idx))
    close(summed, dense[uniq], dtype)

    t2 = table.copy()
    assert K.scatter_add_rows_inplace(t2, idx, rows) is None
    close(t2, table.astype(np.float64) + dense, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_sum_large_range(rng, dtype):
    # index range far larger than n -> sort-based path
    idx = rng.choice(np.array([3, 10 ** 9, 7, 2 ** 40, 123456789]), size=40)
    rows = rng.standard_normal((40, 5)).astype(dtype)
    uniq, summed = K.segment_sum_rows(idx, rows)
    ref_u = np.unique(idx)
    np.testing.assert_array_equal(uniq, ref_u)
    ref = np.stack([rows[idx == u].astype(np.float64).sum(0) for u in ref_u])
    close(summed, ref, dtype)


@pytest.mark.parametrize("itype", IDTYPES)
def test_scatter_large_range(rng, itype):
    # few indices spread over a large table -> sort-based grouping path
    V, D, n = 300_000, 3, 20
    idx = rng.integers(0, V, n).astype(itype)
    idx[[3, 7, 11]] = V - 1
    rows = rng.standard_normal((n, D))
    dense = np.zeros((V, D))
    np.add.at(dense, idx, rows)
    np.testing.assert_allclose(K.embedding_scatter_add(idx, rows, V), dense, rtol=1e-12, atol=1e-12)
    table = rng.standard_normal((V, D)).astype(np.float32)
    ref = table.astype(np.float64) + dense
    K.scatter_add_rows_inplace(table, idx, rows)  # float64 rows cast to the table's float32
    np.testing.assert_allclose(table, ref, rtol=1e-5, atol=1e-6)


def test_embedding_errors():
    table = np.zeros((5, 3))
    for bad in (5, -1):
        idx = np.array([0, 1, bad, 2])
        with pytest.raises(IndexError, match=rf"embedding_gather.*{bad}.*5"):
            K.embedding_gather(table, idx)
        with pytest.raises(IndexError, match=rf"embedding_scatter_add.*{bad}.*5"):
            K.embedding_scatter_add(idx, np.zeros((4, 3)), 5)
        with pytest.raises(IndexError, match=rf"scatter_add_rows_inplace.*{bad}.*5"):
            K.scatter_add_rows_inplace(table, idx, np.zeros((4, 3)))
    with pytest.raises(IndexError, match="segment_sum_rows"):
        K.segment_sum_rows(np.array([0, -3]), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="embedding_gather"):
        K.embedding_gather(table, np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="embedding_scatter_add"):
        K.embedding_scatter_add(np.array([0, 1]), np.zeros((3, 3)), 5)
    with pytest.raises(ValueError, match="segment_sum_rows"):
        K.segment_sum_rows(np.array([0, 1]), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="scatter_add_rows_inplace"):
        K.scatter_add_rows_inplace(table, np.array([0, 1]), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="scatter_add_rows_inplace"):
        K.scatter_add_rows_inplace(np.zeros((3, 5)).T, np.array([0]), np.zeros((1, 3)))
    assert np.abs(table).sum() == 0  # failed calls did not touch the table
    u, s = K.segment_sum_rows(np.zeros(0, np.int64), np.zeros((0, 4), np.float32))
    assert u.shape == (0,) and s.shape == (0, 4) and s.dtype == np.float32


# ----------------------------------------------------------------------------- finite differences

def fd_check(f, x, dx_analytic, r, h=1e-6, rtol=1e-6, atol=1e-8):
    """d/dx <f(x), r> by central differences, compared with dx_analytic."""
    num = np.empty_like(x)
    flat, nflat = x.reshape(-1), num.reshape(-1)
    for k in range(flat.size):
        v = flat[k]
        flat[k] = v + h
        fp = np.vdot(f(x), r)
        flat[k] = v - h
        fm = np.vdot(f(x), r)
        flat[k] = v
        nflat[k] = (fp - fm) / (2 * h)
    np.testing.assert_allclose(dx_analytic, num, rtol=rtol, atol=atol)


def test_fd_gelu(rng):
    x = rng.standard_normal(40) * 3
    r = rng.standard_normal(40)
    fd_check(K.gelu_fwd, x, K.gelu_bwd(x, r), r)


def test_fd_softmax(rng):
    x = rng.standard_normal((3, 6))
    r = rng.standard_normal((3, 6))
    fd_check(K.softmax_fwd, x, K.softmax_bwd(K.softmax_fwd(x), r), r)
    fd_check(K.log_softmax_fwd, x, K.log_softmax_bwd(K.log_softmax_fwd(x), r), r)


def test_fd_xent(rng):
    x = rng.standard_normal((4, 6))
    lab = rng.integers(0, 6, 4)
    t = rng.random((4, 6))
    r = rng.standard_normal(4)
    fd_check(lambda z: K.softmax_xent_sparse_fwd(z, lab), x, K.softmax_xent_sparse_bwd(x, lab, r), r)
    fd_check(lambda z: K.softmax_xent_dense_fwd(z, t), x, K.softmax_xent_dense_bwd(x, t, r), r)


def test_fd_layernorm(rng):
    N, D, eps = 3, 7, 1e-3
    x = rng.standard_normal((N, D))
    g = rng.standard_normal(D)
    b = rng.standard_normal(D)
    r = rng.standard_normal((N, D))
    fd_check(lambda z: K.layernorm_fwd(z, g, b, eps), x, K.layernorm_bwd(x, g, r, eps), r)
    dgb = K.layernorm_bwd_params(x, r, eps)
    fd_check(lambda gg: K.layernorm_fwd(x, gg, b, eps), g, dgb[0], r)
    fd_check(lambda bb: K.layernorm_fwd(x, g, bb, eps), b, dgb[1], r)


@pytest.mark.parametrize("cfg", [(2, 2, 5, 6, 3, 3, 2, 2, 1, 1), (1, 2, 6, 5, 2, 3, 1, 2, 1, 1)])
def test_fd_pool(rng, cfg):
    N, C, H, W, kh, kw, sh, sw, ph, pw = cfg
    x = rng.permutation(N * C * H * W).reshape(N, C, H, W) * 0.01  # distinct values: no ties
    OH, OW = out_size(H, kh, sh, ph), out_size(W, kw, sw, pw)
    r = rng.standard_normal((N, C, OH, OW))
    fd_check(lambda z: K.maxpool2d_fwd(z, kh, kw, sh, sw, ph, pw), x,
             K.maxpool2d_bwd(x, r, kh, kw, sh, sw, ph, pw), r, h=1e-4)
    fd_check(lambda z: K.avgpool2d_fwd(z, kh, kw, sh, sw, ph, pw), x,
             K.avgpool2d_bwd(r, N, C, H, W, kh, kw, sh, sw, ph, pw), r)


# ----------------------------------------------------------------------------- BLAS thread policy

def test_blas_thread_policy_by_gemm_size_load_and_pin():
    import threading
    import time

    from runtime.threads import MIN_PARALLEL_FLOPS, BlasThreads

    b = BlasThreads()
    b.max_threads, b.pinned = 2, None
    b._next_sample = time.monotonic() + 3600  # no /proc/stat sample during the test
    b.shared = False
    assert b.want(MIN_PARALLEL_FLOPS / 2) == 1          # small GEMMs: one thread, always
    assert b.want(MIN_PARALLEL_FLOPS * 4) == 2          # large ones: every thread on an idle machine ...
    b.shared = True
    assert b.want(MIN_PARALLEL_FLOPS * 4) == 1          # ... and one while other processes busy the cores
    b.pinned = 3
    assert b.want(1) == 3                               # INSIGHT_BLAS_THREADS
    b.pinned, b.current = None, "unchanged"
    t = threading.Thread(target=b.for_gemm, args=(512, 512, 512))
    t.start()
    t.join()
    assert b.current == "unchanged"                     # a worker thread never resizes the pool


def test_blas_thread_policy_sees_another_busy_process():
    """A busy child process (one core) is measured as foreign load."""
    import subprocess
    import sys
    import time

    from runtime.threads import BlasThreads

    b = BlasThreads()
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.3)
        b._sample(time.monotonic())
        time.sleep(0.6)
        b._sample(time.monotonic())
        assert b.shared, "a process spinning on a core should mark the machine as shared"
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_runtime_gemm_on_openmp_threads_equals_numpy(dtype, threads):
    """The runtime's GEMMs (``runtime.threads.blas.matmul``: single-threaded BLAS calls on the OpenMP threads)
    give numpy's product for every layout the graphs produce: transposed views, batched products whose
    batch axes do not collapse (attention's (B, S, H, D) -> (B, H, S, D) views), a 2-d operand against a
    batch, one row; and what BLAS cannot take (integers, no unit stride) still works."""
    from runtime.threads import BlasThreads

    b = BlasThreads()
    b.pinned = threads
    rng = np.random.default_rng(3)

    def r(*shape):
        return rng.standard_normal(shape).astype(dtype)

    q = r(4, 70, 3, 16).transpose(0, 2, 1, 3)                        # (4, 3, 70, 16), batch axes strided
    cases = [(r(130, 40), r(40, 90)), (r(40, 130).T, r(40, 90)), (r(130, 40), r(90, 40).T),
             (r(40, 130).T, r(90, 40).T), (q, np.swapaxes(q, -1, -2)), (q, r(4, 3, 16, 5)),
             (r(6, 33, 20), r(20, 7)), (r(20, 7).T, r(6, 20, 9)), (r(1, 20), r(20, 7)), (r(300, 2), r(2, 300))]
    for a, bm in cases:
        want = np.matmul(a, bm)
        got = b.matmul(a, bm)
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)
        out = np.empty(want.shape, dtype)
        assert b.matmul(a, bm, out=out) is out
        np.testing.assert_allclose(out, want, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)
    ints = rng.integers(-5, 5, (7, 4)), rng.integers(-5, 5, (4, 3))
    np.testing.assert_array_equal(b.matmul(*ints), ints[0] @ ints[1])
    swapped = r(5, 7).astype(np.dtype(dtype).newbyteorder())        # another byte order: numpy's path
    np.testing.assert_allclose(b.matmul(swapped, swapped.T), swapped.astype(dtype) @ swapped.astype(dtype).T,
                               rtol=1e-6)
    frozen = np.empty((5, 5), dtype)
    frozen.flags.writeable = False
    with pytest.raises(ValueError):                                   # a read-only output: numpy's error
        b.matmul(r(5, 7), r(7, 5), out=frozen)
    every_other, rhs = r(12, 8)[:, ::2], r(4, 3)                   # no unit stride: numpy's path
    np.testing.assert_allclose(b.matmul(every_other, rhs), np.matmul(every_other, rhs), rtol=1e-6)
    sq = r(16, 16)
    want = sq @ sq
    assert b.matmul(sq, sq, out=sq) is sq                             # the output over both operands
    np.testing.assert_allclose(sq, want, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)


def test_runtime_gemm_random_layouts_equal_numpy():
    """Random shapes, batch ranks, transposes, strided batch axes, broadcast 2-d operands, empty dimensions and
    1-3 threads: ``blas.matmul`` always equals ``np.matmul`` (shape, dtype, values), whichever path runs it."""
    from runtime.threads import BlasThreads

    b = BlasThreads()
    rng = np.random.default_rng(11)
    for trial in range(300):
        b.pinned = int(rng.integers(1, 4))
        dtype = (np.float32, np.float64)[trial % 2]
        m, k, n = (int(v) for v in rng.integers(0, 40, 3))
        batch = tuple(int(v) for v in rng.integers(1, 4, int(rng.integers(0, 3))))
        shape_a = batch + (m, k) if rng.random() < 0.8 else (m, k)
        shape_b = batch + (k, n) if rng.random() < 0.8 or len(shape_a) == 2 else (k, n)

        def operand(shape):
            x = rng.standard_normal(shape).astype(dtype)
            if rng.random() < 0.4:                                   # stored transposed, viewed back
                x = np.ascontiguousarray(np.swapaxes(x, -1, -2)).swapaxes(-1, -2)
            if len(shape) >= 4 and rng.random() < 0.5:               # batch axes that do not collapse
                x = np.ascontiguousarray(np.swapaxes(x, 0, 1)).swapaxes(0, 1)
            return x

        a, c = operand(shape_a), operand(shape_b)
        want = np.matmul(a, c)
        got = b.matmul(a, c)
        assert got.shape == want.shape and got.dtype == want.dtype, (shape_a, shape_b)
        np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12,
                                   atol=1e-4 if dtype == np.float32 else 1e-12, err_msg=f"{shape_a} @ {shape_b}")
