"""Collective communication between processes, MindSpore's ``mindspore.communication`` shape, over MPI.

    from runtime import context
    from runtime.communication import init, get_rank, get_group_size
    init()                                            # every process of `mpirun -n N python train.py`
    context.set_auto_parallel_context(parallel_mode="data_parallel", gradients_mean=True)

The processes are started by OpenMPI's ``mpirun`` and talk through mpi4py (an optional dependency: the
``distributed`` extra). Nothing here is a home-made launcher or socket protocol.

* ``init()`` joins the MPI world (``MPI_COMM_WORLD``); ``get_rank()`` / ``get_group_size()``; ``release()``.
* What the runtime uses: ``all_reduce`` / ``all_gather`` on numpy arrays (non-blocking MPI requests, waited
  for on the calling thread -- the ``comm`` stream's worker -- with the GIL released), ``broadcast`` of
  parameters from rank 0, and ``broadcast_object`` / ``barrier`` for the profiler.

Without ``init()`` a process is a group of one: every collective is the identity, so the same graph runs
alone (tests, gradient checks).
"""
from __future__ import annotations

import numpy as np

from runtime import context

HCCL_WORLD_GROUP = "hccl_world_group"  # MindSpore's name for the world group; the only group here
NCCL_WORLD_GROUP = "nccl_world_group"
_WORLD_NAMES = (None, HCCL_WORLD_GROUP, NCCL_WORLD_GROUP, "world")


class CommunicationError(RuntimeError):
    """The communication layer cannot do what was asked (mpi4py or MPI missing, not initialized, bad group)."""


class _State:
    mpi = None      # the mpi4py.MPI module once init() ran
    comm = None     # the world communicator
    rank = 0
    size = 1


_state = _State()


def _load_mpi():
    try:
        import mpi4py  # noqa: F401  (optional dependency, imported only when asked for)
    except ImportError:
        raise CommunicationError(
            "runtime.communication.init: the Python package 'mpi4py' is not installed; install it with "
            "`pip install -e '.[distributed]'` (it needs an MPI library: Debian `apt-get install openmpi-bin "
            "libopenmpi-dev`)") from None
    try:
        from mpi4py import MPI
    except (ImportError, OSError, RuntimeError) as e:
        raise CommunicationError(
            "runtime.communication.init: mpi4py is installed but the MPI library could not be loaded "
            f"({type(e).__name__}: {e}); install OpenMPI (Debian `apt-get install openmpi-bin libopenmpi-dev`) "
            "and reinstall mpi4py against it") from None
    return MPI


def init(backend_name: str | None = None) -> None:
    """Join the process group started by ``mpirun`` (a single process started without mpirun is a group of
    one). ``backend_name``: None, "mpi", "hccl" or "nccl" (all mean MPI here). Calling it twice is harmless."""
    if backend_name not in (None, "mpi", "hccl", "nccl"):
        raise CommunicationError(f"runtime.communication.init: unknown backend {backend_name!r}; this runtime "
                                 f"communicates through MPI (backend_name None or 'mpi')")
    if _state.comm is not None:
        return
    MPI = _load_mpi()
    try:
        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
    except Exception as e:  # noqa: BLE001 - MPI_Init failures come in several types
        raise CommunicationError(f"runtime.communication.init: MPI could not start ({type(e).__name__}: {e})") from None
    if MPI.Query_thread() < MPI.THREAD_SERIALIZED:
        raise CommunicationError("runtime.communication.init: the MPI library gives no thread support (need at least "
                                 "MPI_THREAD_SERIALIZED: collectives run on the comm stream's thread)")
    _state.mpi, _state.comm, _state.rank, _state.size = MPI, comm, rank, size


def is_initialized() -> bool:
    return _state.comm is not None


def _check_group(group, who):
    if group not in _WORLD_NAMES:
        raise CommunicationError(f"{who}: unknown group {group!r}; only the world group exists")


def get_rank(group: str | None = None) -> int:
    """This process's rank in the world group (0 .. size-1). Needs ``init()``."""
    _check_group(group, "get_rank")
    if _state.comm is None:
        raise CommunicationError("get_rank: call runtime.communication.init() first")
    return _state.rank


def get_group_size(group: str | None = None) -> int:
    """Number of processes in the world group. Needs ``init()``."""
    _check_group(group, "get_group_size")
    if _state.comm is None:
        raise CommunicationError("get_group_size: call runtime.communication.init() first")
    return _state.size


def rank_and_size() -> tuple[int, int]:
    """(rank, group size), (0, 1) when ``init()`` was not called."""
    return _state.rank, _state.size


def release() -> None:
    """Leave the group: this process is a group of one again (MPI itself is finalized at exit)."""
    _state.comm = None
    _state.rank, _state.size = 0, 1


def data_parallel() -> bool:
    """True when gradients are to be AllReduced (parallel_mode is data_parallel). Without init() the process is a
    group of one and the AllReduce tasks still run, as identities."""
    return context.get_auto_parallel_context("parallel_mode") == context.DATA_PARALLEL


def fusion_buckets(n: int, split_indices: list[int] | None = None) -> list[list[int]]:
    """Gradient indices per AllReduce bucket for ``n`` gradients and MindSpore-style split indices (default:
    ``all_reduce_fusion_config`` of the auto-parallel context; ``[]`` -> one bucket per gradient)."""
    if split_indices is None:
        split_indices = context.get_auto_parallel_context("all_reduce_fusion_config")
    if not split_indices:
        return [[k] for k in range(n)]
    bad = [i for i in split_indices if not 0 < i < n]
    if bad:
        raise ValueError(f"all_reduce_fusion_config {split_indices}: split indices must lie in 1..{n - 1} for a "
                         f"step with {n} gradients (got {bad})")
    bounds = [0] + list(split_indices) + [n]
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]


# -- collectives on numpy arrays ------------------------------------------------------------------------
def _mpi_op(op: str):
    if op in ("sum", "mean"):
        return _state.mpi.SUM
    if op == "max":
        return _state.mpi.MAX
    if op == "min":
        return _state.mpi.MIN
    raise CommunicationError(f"all_reduce: unknown reduction {op!r} (sum, mean, max, min)")


def all_reduce(x: np.ndarray, op: str = "sum") -> np.ndarray:
    """Element-wise reduction of ``x`` over the group, the same result on every rank (a new array).
    A non-blocking ``Iallreduce`` waited for on the calling thread (mpi4py releases the GIL while waiting)."""
    shape = np.shape(x)
    x = np.ascontiguousarray(x).reshape(shape)  # (ascontiguousarray makes a 0-d array 1-d)
    if _state.comm is None or _state.size == 1:
        out = np.array(x, copy=True)
    else:
        out = np.empty_like(x)
        _state.comm.Iallreduce(x, out, op=_mpi_op(op)).Wait()
    if op == "mean" and _state.size > 1:
        if out.dtype.kind != "f":
            raise CommunicationError(f"all_reduce: op 'mean' needs a floating-point array, got {out.dtype}")
        out *= out.dtype.type(1.0 / _state.size)
    return out


def all_gather(x: np.ndarray) -> np.ndarray:
    """Every rank's ``x`` (same shape on every rank) stacked along axis 0, in rank order."""
    x = np.ascontiguousarray(x)
    if _state.comm is None or _state.size == 1:
        return np.array(x, copy=True)
    out = np.empty((_state.size * x.shape[0],) + x.shape[1:], x.dtype)
    _state.comm.Iallgather(x, out).Wait()
    return out


def broadcast(arrays: list[np.ndarray], root: int = 0) -> None:
    """Overwrite each array in place with rank ``root``'s values (one message for all of them)."""
    if _state.comm is None or _state.size == 1 or not arrays:
        return
    by_dtype: dict = {}
    for a in arrays:
        by_dtype.setdefault(a.dtype.str, []).append(a)
    for _, group in sorted(by_dtype.items()):
        flat = np.concatenate([a.ravel() for a in group]) if len(group) > 1 else np.ascontiguousarray(group[0]).ravel()
        _state.comm.Bcast(flat, root=root)
        off = 0
        for a in group:
            a[...] = flat[off:off + a.size].reshape(a.shape)
            off += a.size


def broadcast_parameters(params, root: int = 0) -> None:
    """Rank ``root``'s values of every Parameter (network weights, statistics, optimizer state) on every rank."""
    broadcast([p.data for p in params], root)


def broadcast_object(obj, root: int = 0):
    """A picklable object from rank ``root`` (returned on every rank)."""
    if _state.comm is None or _state.size == 1:
        return obj
    return _state.comm.bcast(obj, root=root)


def gather_object(obj, root: int = 0):
    """Every rank's object, in rank order, on rank ``root`` (None elsewhere)."""
    if _state.comm is None or _state.size == 1:
        return [obj]
    return _state.comm.gather(obj, root=root)


def barrier() -> None:
    if _state.comm is not None and _state.size > 1:
        _state.comm.Barrier()


__all__ = ["init", "release", "get_rank", "get_group_size", "is_initialized", "rank_and_size", "data_parallel",
           "all_reduce", "all_gather", "broadcast", "broadcast_parameters", "broadcast_object", "gather_object",
           "barrier", "fusion_buckets", "CommunicationError", "HCCL_WORLD_GROUP", "NCCL_WORLD_GROUP"]
