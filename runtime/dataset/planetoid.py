"""The Planetoid citation graphs (Cora, Citeseer) from the standard ``ind.<name>.*`` files.

The files (Yang et al., ICML 2016; the copy used by GCN, GAT, PyG and MindSpore's model zoo) are
published at https://github.com/kimiyoung/planetoid/tree/master/data (also
https://github.com/tkipf/gcn/tree/master/gcn/data, byte-identical). ``load_planetoid(name, data_dir)``
reads them from a directory (``data_dir`` or the ``INSIGHT_PLANETOID_DIR`` environment variable).

The files are Python 2 pickles. They are read with a restricted unpickler that admits only what
they contain -- numpy arrays (``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``,
non-object ``numpy.dtype``), SciPy CSR matrices (rebuilt as a plain record WITHOUT importing SciPy),
``collections.defaultdict`` and ``list`` -- and refuses any other global with a
``PlanetoidFormatError`` naming it, before anything is called.

The split is the standard one (Kipf & Welling): the first 140 (Cora) / 120 (Citeseer) nodes train, the
next 500 validate, the 1000 ids of ``test.index`` test. Citeseer's test ids span 1015 positions of which
15 are isolated nodes with no features: they get zero feature rows and no label (-1). Features are
row-normalised (each row sums to 1; zero rows stay zero), as the GCN and GAT papers do.
"""
from __future__ import annotations

import collections
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

ENV_VAR = "INSIGHT_PLANETOID_DIR"
SUFFIXES = ("x", "y", "tx", "ty", "allx", "ally", "graph")
DATASETS = ("cora", "citeseer")
_TRAIN_SIZE = {"cora": 140, "citeseer": 120}


class PlanetoidFormatError(ValueError):
    """A Planetoid file is missing, malformed or names a class the loader does not admit."""


class _PickledCSR:
    """What a pickled ``scipy.sparse.csr_matrix`` carries, rebuilt without SciPy (state is only set)."""

    _KEYS = {"data", "indices", "indptr", "_shape", "format", "maxprint", "has_sorted_indices",
             "_has_sorted_indices", "_has_canonical_format", "has_canonical_format",
             "_cs_matrix__has_sorted_indices", "_cs_matrix__has_canonical_format"}

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise PlanetoidFormatError(f"csr_matrix state must be a dict, got {type(state).__name__}")
        unknown = set(state) - self._KEYS
        if unknown:
            raise PlanetoidFormatError(f"csr_matrix state has unexpected fields {sorted(unknown)}")
        for k in ("data", "indices", "indptr"):
            if not isinstance(state.get(k), np.ndarray):
                raise PlanetoidFormatError(f"csr_matrix field {k!r} is not a numpy array")
        self.data, self.indices, self.indptr = state["data"], state["indices"], state["indptr"]
        shape = state.get("_shape")
        if not (isinstance(shape, tuple) and len(shape) == 2):
            raise PlanetoidFormatError(f"csr_matrix has no valid shape: {shape!r}")
        self.shape = (int(shape[0]), int(shape[1]))
        if (self.indptr.shape != (self.shape[0] + 1,) or self.indices.shape != self.data.shape
                or int(self.indptr[-1]) != self.data.shape[0]
                or (self.indices.size and (self.indices.min() < 0 or self.indices.max() >= self.shape[1]))):
            raise PlanetoidFormatError(f"csr_matrix of shape {self.shape} has inconsistent indptr/indices")

    def toarray(self) -> np.ndarray:
        out = np.zeros(self.shape, dtype=np.float32)
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.indptr))
        np.add.at(out, (rows, self.indices), self.data.astype(np.float32))
        return out


def _safe_dtype(*args):
    dt = np.dtype(*args)
    if dt.hasobject:
        raise PlanetoidFormatError(f"refusing a numpy dtype that holds Python objects ({dt})")
    return dt


_ALLOWED = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: _safe_dtype,
    ("numpy.core.multiarray", "_reconstruct"): lambda: _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): lambda: _reconstruct,
    ("scipy.sparse.csr", "csr_matrix"): lambda: _PickledCSR,
    ("scipy.sparse._csr", "csr_matrix"): lambda: _PickledCSR,
    ("collections", "defaultdict"): lambda: collections.defaultdict,
    ("__builtin__", "list"): lambda: list,
    ("builtins", "list"): lambda: list,
    ("__builtin__", "int"): lambda: int,
    ("builtins", "int"): lambda: int,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only the globals the Planetoid files use; anything else is refused before it is called."""

    def __init__(self, file, source: str = "<pickle>"):
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module, name):
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise PlanetoidFormatError(
                f"{self.source}: refusing to load the class {module}.{name}: the Planetoid loader admits "
                f"only numpy arrays, SciPy CSR matrices, defaultdict, list and int")
        return factory()


def restricted_load(path: Path):
    path = Path(path)
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, str(path)).load()
        except PlanetoidFormatError:
            raise
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError) as e:
            raise PlanetoidFormatError(f"{path}: not a readable Planetoid pickle ({type(e).__name__}: {e})") \
                from None


@dataclass
class CSR:
    """A sparse matrix in CSR form: row ``i`` holds ``indices[indptr[i]:indptr[i+1]]`` (sorted)."""
    indptr: np.ndarray   # (rows + 1,) int64
    indices: np.ndarray  # (nnz,) int32
    data: np.ndarray     # (nnz,) float32
    shape: tuple

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    def toarray(self) -> np.ndarray:
        out = np.zeros(self.shape, dtype=self.data.dtype)
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.indptr))
        out[rows, self.indices] = self.data
        return out

    @staticmethod
    def from_coo(rows, cols, vals, shape) -> "CSR":
        rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
        order = np.lexsort((cols, rows))
        rows, cols, vals = rows[order], cols[order], np.asarray(vals, np.float32)[order]
        indptr = np.zeros(shape[0] + 1, np.int64)
        np.add.at(indptr, rows + 1, 1)
        return CSR(np.cumsum(indptr), cols.astype(np.int32), vals, (int(shape[0]), int(shape[1])))


@dataclass
class Planetoid:
    name: str
    features: CSR            # (N, F) row-normalised
    labels: np.ndarray       # (N,) int32 class ids; -1 for Citeseer's isolated test nodes
    adjacency: CSR           # (N, N) symmetric 0/1, no self loops, row i lists i's neighbours
    train_mask: np.ndarray   # (N,) bool
    val_mask: np.ndarray
    test_mask: np.ndarray

    @property
    def num_nodes(self) -> int:
        return self.labels.shape[0]

    @property
    def num_features(self) -> int:
        return self.features.shape[1]

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def masked_labels(self, mask: np.ndarray) -> np.ndarray:
        """Labels where ``mask`` holds and -1 elsewhere (what the masked loss and metrics take)."""
        return np.where(mask, self.labels, -1).astype(np.int32)


def _csr_rows(m: _PickledCSR, path) -> _PickledCSR:
    if not isinstance(m, _PickledCSR):
        raise PlanetoidFormatError(f"{path}: expected a CSR matrix, got {type(m).__name__}")
    return m


def _vstack(mats) -> CSR:
    indptrs, indices, data, rows = [np.zeros(1, np.int64)], [], [], 0
    ncols = mats[0].shape[1]
    for m in mats:
        if m.shape[1] != ncols:
            raise PlanetoidFormatError(f"feature blocks have {m.shape[1]} and {ncols} columns")
        indptrs.append(m.indptr[1:].astype(np.int64) + indptrs[-1][-1])
        indices.append(m.indices)
        data.append(m.data)
        rows += m.shape[0]
    return CSR(np.concatenate(indptrs), np.concatenate(indices).astype(np.int32),
               np.concatenate(data).astype(np.float32), (rows, ncols))


def _permute_rows(m: CSR, order: np.ndarray, n_out: int) -> CSR:
    """Row ``order[k]`` of the result is row ``k`` of ``m``; rows not hit stay empty."""
    rows = np.repeat(order, np.diff(m.indptr))
    return CSR.from_coo(rows, m.indices, m.data, (n_out, m.shape[1]))


def _row_normalise(m: CSR) -> CSR:
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    sums = np.bincount(rows, weights=m.data.astype(np.float64), minlength=m.shape[0])
    inv = np.divide(1.0, sums, out=np.zeros_like(sums), where=sums != 0)
    scale = np.repeat(inv, np.diff(m.indptr))
    return CSR(m.indptr, m.indices, (m.data * scale).astype(np.float32), m.shape)


def resolve_dir(data_dir=None) -> Path:
    d = data_dir if data_dir is not None else os.environ.get(ENV_VAR)
    if not d:
        raise PlanetoidFormatError(
            f"no Planetoid directory: pass data_dir (--data-dir) or set {ENV_VAR}; the ind.<name>.* files are "
            f"published at https://github.com/kimiyoung/planetoid/tree/master/data")
    d = Path(d)
    if not d.is_dir():
        raise PlanetoidFormatError(f"Planetoid directory {d} does not exist")
    return d


def load_planetoid(name: str, data_dir=None) -> Planetoid:
    """Load Cora or Citeseer with the standard split, row-normalised features and a CSR adjacency."""
    name = name.lower()
    if name not in DATASETS:
        raise PlanetoidFormatError(f"unknown Planetoid dataset {name!r}; choose one of {', '.join(DATASETS)}")
    d = resolve_dir(data_dir)
    parts = {}
    for s in SUFFIXES + ("test.index",):
        p = d / f"ind.{name}.{s}"
        if not p.is_file():
            raise PlanetoidFormatError(f"missing file {p}")
        if s != "test.index":
            parts[s] = restricted_load(p)
    idx_path = d / f"ind.{name}.test.index"
    try:
        test_idx = np.array([int(line) for line in idx_path.read_text().split()], np.int64)
    except ValueError as e:
        raise PlanetoidFormatError(f"{idx_path}: expected one integer per line ({e})") from None
    x, tx, allx = (_csr_rows(parts[k], d / f"ind.{name}.{k}") for k in ("x", "tx", "allx"))
    ys = {}
    for k in ("y", "ty", "ally"):
        if not isinstance(parts[k], np.ndarray) or parts[k].ndim != 2:
            raise PlanetoidFormatError(f"{d / f'ind.{name}.{k}'}: expected a 2-d one-hot numpy array")
        ys[k] = parts[k]
    graph = parts["graph"]
    if not isinstance(graph, dict):
        raise PlanetoidFormatError(f"{d / f'ind.{name}.graph'}: expected a dict of adjacency lists")
    if tx.shape[0] != test_idx.size or ys["ty"].shape[0] != test_idx.size:
        raise PlanetoidFormatError(f"{name}: {test_idx.size} test ids but tx has {tx.shape[0]} rows")

    n_all = allx.shape[0]
    lo, hi = int(test_idx.min()), int(test_idx.max())
    n = max(hi + 1, n_all)  # Citeseer: isolated test ids leave gaps -> zero rows
    if lo < n_all:
        raise PlanetoidFormatError(f"{name}: test ids start at {lo}, inside the {n_all} labelled/unlabelled rows")
    # rows: allx (0..n_all-1), then test rows placed at their ids
    feats_all = _vstack([allx])
    feats_test = _permute_rows(_vstack([tx]), test_idx, n)
    feats = _vstack([feats_all, CSR(feats_test.indptr[n_all:] - feats_test.indptr[n_all],
                                    feats_test.indices, feats_test.data, (n - n_all, tx.shape[1]))])
    labels = np.full(n, -1, np.int32)
    ally, ty = ys["ally"], ys["ty"]
    has = ally.sum(1) > 0
    labels[:n_all][has] = ally.argmax(1)[has]
    has_t = ty.sum(1) > 0
    labels[test_idx[has_t]] = ty.argmax(1)[has_t]

    rows, cols = [], []
    for src, nbrs in graph.items():
        if not isinstance(nbrs, list):
            raise PlanetoidFormatError(f"{name}: adjacency list of node {src} is not a list")
        for dst in nbrs:
            rows.append(int(src))
            cols.append(int(dst))
    rows, cols = np.array(rows, np.int64), np.array(cols, np.int64)
    if rows.size and (min(rows.min(), cols.min()) < 0 or max(rows.max(), cols.max()) >= n):
        raise PlanetoidFormatError(f"{name}: graph names nodes outside 0..{n - 1}")
    keep = rows != cols
    r = np.concatenate([rows[keep], cols[keep]])
    c = np.concatenate([cols[keep], rows[keep]])
    key = np.unique(r * n + c)  # symmetric, deduplicated
    adj = CSR.from_coo(key // n, key % n, np.ones(key.size, np.float32), (n, n))

    n_train = _TRAIN_SIZE[name]
    if x.shape[0] != n_train:
        raise PlanetoidFormatError(f"{name}: x has {x.shape[0]} rows, expected {n_train}")
    train = np.zeros(n, bool)
    train[:n_train] = True
    val = np.zeros(n, bool)
    val[n_train:n_train + 500] = True
    test = np.zeros(n, bool)
    test[test_idx] = True
    return Planetoid(name, _row_normalise(feats), labels, adj, train, val, test)
