"""Primitives (registered on import) and the functional ops API."""
from runtime.ops import prims as _prims  # noqa: F401  (registers every primitive)
from runtime.ops import fused as _fused  # noqa: F401  (graph-kernel fusion primitives)
from runtime.ops import quant as _quant  # noqa: F401  (fake-quant and int8 primitives)
from runtime.ops import sparse as _sparse  # noqa: F401  (GNN sparse primitives: spmm, edge softmax, ...)
from runtime.ops import amp as _amp  # noqa: F401  (mixed precision: scale_gradient, all_finite)
from runtime.ops import comm as _comm  # noqa: F401  (all_reduce / all_gather on the comm stream)
from runtime.ops import embedding as _embedding  # noqa: F401  (EmbeddingLookup: unique ids, fused sparse FTRL / LazyAdam)
from runtime.ops import attention as _attention  # noqa: F401  (fused flash-style attention, forward and backward)
from runtime.ops import methods as _methods  # noqa: F401  (Tensor operators)
from runtime.ops.api import *  # noqa: F401,F403
from runtime.ops.api import slice, pow, abs  # noqa: F401,A004  (names the star import skips)
from runtime.ops.registry import Primitive, ShapeError, all_primitives, get_primitive  # noqa: F401
