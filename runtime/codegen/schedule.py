"""The schedule of a fused group: ``analyze(SubGraph) -> Plan``, how ONE kernel walks the group.

``analyze`` maps every value of the group onto ONE iteration domain and decides how a single
kernel walks it:

* the domain is the common refinement of every full-size shape in the group (all shapes of the
  group's largest element count), collapsed so that adjacent axes with the same broadcast /
  reduce behaviour merge (``(16, 128, 256) + bias(256,)`` -> ``(2048, 256)``);
* every value gets a *pattern*: the set of domain axes it spans. A broadcast operand (bias,
  scalar, per-channel statistics) is read through index arithmetic with stride 0 on the axes it
  does not span -- never materialised; views (reshape / expand_dims / squeeze / broadcast_to)
  are free aliases because they keep the flat layout;
* reductions (sum, max) accumulate in double. A reduction whose result the group consumes
  (softmax's max and sum, layer norm's mean and variance) splits the kernel into *phases*: the
  values after it are computed in a later phase that re-reads (recomputes) what it needs.
  If every consumed reduction keeps domain axis 0, the phases run per cache-sized chunk of
  axis 0 ("local" mode: one pass over memory); otherwise each phase is a parallel pass over the
  whole domain ("global" mode, e.g. batch norm's statistics over N, H, W);
* accumulation order is fixed by the plan (never by the thread count): lanes ``j % 8`` along
  the innermost axis when it is reduced, combined by a fixed tree, per-chunk partials combined
  in chunk order. The C kernels and the Cython interpreter follow the same order, so they give
  bit-identical results.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from runtime.codegen.subgraph import BOOL, REDUCE_OPS, SUBGRAPH_OPS, VIEW_OPS, NotFusible, SubGraph

LANES = 8          # lane partials when the innermost axis is reduced
CHUNK_ELEMS = 16384  # target elements per chunk (x the group's arrays: a cache-sized tile)
PHASED_CHUNK_ELEMS = 4096   # multi-phase kernels re-read the chunk once per phase: keep it in L1/L2
MAX_CHUNKS_CROSS = 128      # per-chunk partials of reductions over axis 0 are combined serially
CROSS_BUDGET = 16 << 20  # bytes of per-chunk partial accumulators allowed


@functools.lru_cache(maxsize=1 << 16)
def _size(shape) -> int:
    return math.prod(shape)


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------
@dataclass
class Val:
    kind: str            # "in" | "const" | "red" | "op"
    a: int = 0           # input index / reduction index
    c: float = 0.0       # constant value (float32)
    op: str = ""         # primitive-level op name for kind "op" (UNARY/BINARY/TERNARY key)
    args: tuple = ()     # value ids
    mask: int = 0        # domain axes spanned
    phase: int = 0       # earliest phase it can be computed in


@dataclass
class Red:
    src: int             # value id accumulated
    kind: str            # "sum" | "max"
    rmask: int           # reduced axes
    kmask: int           # kept axes
    phase: int           # phase it accumulates in (its result is usable from phase + 1)
    cls: str             # "S1": reduces a suffix of axes (row-local) ; "S2": scattered accumulator
    sfx: int             # S1: first reduced axis
    lanes: int           # 1 or LANES
    cross: bool          # reduces axis 0: per-chunk partials combined after the chunks
    consumed: bool       # read by a later phase of this kernel
    out: int = -1        # output index when it is a kernel output


@dataclass
class Out:
    val: int
    u8: bool
    mask: int
    phase: int           # >= 0: stored in the main loop of that phase; -1: epilogue; -2: reduction output
    shape: tuple
    red: int = -1


@dataclass
class Plan:
    dims: tuple
    mode: str            # "local" | "global"
    c0: int
    nchunks: int
    in_masks: list
    in_u8: list
    vals: list
    reds: list
    outs: list
    nphases: int
    inplace: bool
    phase_vals: list = field(default_factory=list)     # per phase: value ids to evaluate (topological)
    epi_vals: list = field(default_factory=list)       # per output (epilogue ones): value ids
    flops: int = 0

    @property
    def K(self) -> int:
        return len(self.dims)

    def structure_key(self) -> tuple:
        """Everything the generated code depends on except the runtime sizes."""
        return (self.K, self.mode, tuple(self.in_masks), tuple(self.in_u8),
                tuple((v.kind, v.a, float(np.float32(v.c)).hex() if v.kind == "const" else 0, v.op, v.args, v.mask)
                      for v in self.vals),
                tuple((r.src, r.kind, r.rmask, r.kmask, r.phase, r.cls, r.sfx, r.lanes, r.cross, r.consumed, r.out)
                      for r in self.reds),
                tuple((o.val, o.u8, o.mask, o.phase, o.red) for o in self.outs),
                self.nphases, self.inplace)

    def strides(self, mask: int) -> list[int]:
        """C-order element strides over the domain axes for a value spanning ``mask``."""
        st, acc = [0] * self.K, 1
        for a in reversed(range(self.K)):
            if mask >> a & 1:
                st[a] = acc
                acc *= self.dims[a]
        return st

    def mask_size(self, mask: int) -> int:
        return math.prod(d for a, d in enumerate(self.dims) if mask >> a & 1)

    def acc_size(self, r: Red) -> int:
        """Doubles of scratch a reduction needs (0: accumulates in registers)."""
        if r.cls == "S1":
            return self.nchunks if r.cross else 0
        per = self.mask_size(r.kmask) * r.lanes
        return per * (self.nchunks if r.cross else 1)


# ---------------------------------------------------------------------------------------------
# analysis
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1 << 16)
def _suffixes(shape):
    out, p = [1], 1
    for d in reversed(shape):
        p *= int(d)
        out.append(p)
    return out  # out[i] = prod(shape[len-i:])


def _refine(shapes, N):
    bps = {1, N}
    for s in shapes:
        bps.update(_suffixes(s))
    bps = sorted(bps)
    for lo, hi in zip(bps, bps[1:]):
        if hi % lo:
            raise NotFusible(f"shapes {sorted(set(map(tuple, shapes)))} have no common refinement")
    dims = [hi // lo for lo, hi in zip(bps, bps[1:])]
    return dims[::-1]  # outermost first


def _axis_map(shape, pat: int, dims) -> list[int]:
    """Domain axes (as masks) covered by each axis of ``shape`` for a value spanning ``pat``."""
    return _axis_map_c(tuple(shape), pat, tuple(dims))


@functools.lru_cache(maxsize=1 << 16)
def _axis_map_c(shape, pat: int, dims) -> list[int]:
    axes = [a for a in range(len(dims)) if pat >> a & 1]
    sub = tuple(dims[a] for a in axes)
    if _size(shape) != _size(sub):
        raise NotFusible(f"shape {tuple(shape)} does not fit its pattern {sub}")
    # breakpoints of the sub-domain, from the inside
    bp = _suffixes(sub)            # bp[t] = prod of the t innermost sub dims
    pos = {p: t for t, p in enumerate(bp)}
    # with duplicated products (impossible: dims > 1) pos is unique
    out = []
    n = len(shape)
    for i in range(n):
        p_in = _size(shape[i + 1:])
        p_out = _size(shape[i:])
        if p_in not in pos or p_out not in pos:
            raise NotFusible(f"shape {tuple(shape)} does not align with the domain {sub}")
        t_in, t_out = pos[p_in], pos[p_out]
        m = 0
        for t in range(t_in, t_out):      # the (t)-th innermost sub axis
            m |= 1 << axes[len(axes) - 1 - t]
        out.append(m)
    return tuple(out)


def analyze(sg: SubGraph) -> Plan:
    """The kernel plan of a group, or NotFusible (with the reason) when it is not one kernel."""
    _check_ops(sg)
    N, rdims = _domain(sg)
    pat = _patterns(sg, N, rdims)
    red_of = _reduced_axes(sg, pat, rdims, N)
    dims, cpat, cred = _collapse(rdims, pat, red_of)
    vals, reds, ref_val = _values(sg, dims, cpat, cred)
    _phases(vals, reds)
    outs = _outputs(sg, vals, reds, ref_val, cpat, dims, N)
    nphases = 1 + max([r.phase for r in reds] + [o.phase for o in outs if o.phase >= 0] + [0])
    mode = "local" if all(not (r.rmask & 1) for r in reds if r.consumed) else "global"
    _classify_reductions(reds, dims)
    c0, nchunks = _chunks(dims, reds, nphases, mode)
    in_masks = [0] * len(sg.in_shapes)
    for v in vals:
        if v.kind == "in":
            in_masks[v.a] = v.mask
    in_u8 = [np.dtype(d) == BOOL for d in sg.in_dtypes]
    plan = Plan(dims, mode, c0, nchunks, in_masks, in_u8, vals, reds, outs, nphases, sg.inplace)
    _phase_work(plan, N)
    return plan


def _check_ops(sg: SubGraph) -> None:
    if not sg.ops:
        raise NotFusible("empty group")
    for o in sg.ops:
        if o.op not in SUBGRAPH_OPS:
            raise NotFusible(f"{o.op} is not fusible")


def _domain(sg: SubGraph):
    """(N, refined dims): the largest element count in the group and the common refinement of every
    shape of that size (outermost first)."""
    iter_sizes = []
    for o in sg.ops:
        if o.op in REDUCE_OPS:
            iter_sizes.append(_size(sg.ref_shape(o.args[0])))
        iter_sizes.append(_size(o.shape))
    N = max(iter_sizes)
    if N == 0:
        raise NotFusible("empty tensors")
    full_shapes = []
    for o in sg.ops:
        if _size(o.shape) == N:
            full_shapes.append(tuple(o.shape))
        for r in o.args:
            if _size(sg.ref_shape(r)) == N:
                full_shapes.append(sg.ref_shape(r))
    return N, (_refine(full_shapes, N) if N > 1 else [1])


def _patterns(sg: SubGraph, N: int, rdims) -> dict:
    """ref -> mask of the refined axes the value spans (inputs: negative refs), by a fixpoint over the
    group: full-size values span everything, scalars nothing, reductions drop their axes, views keep
    their operand's pattern, broadcasts give each operand the axes it really has."""
    R = len(rdims)
    ALL = (1 << R) - 1
    pat: dict[int, int] = {}

    def setpat(ref, m):
        old = pat.get(ref)
        if old is None:
            pat[ref] = m
            return True
        if old != m:
            raise NotFusible(f"value used with two broadcast patterns ({old:b} vs {m:b})")
        return False

    for j, o in enumerate(sg.ops):
        for r in list(o.args) + [j]:
            s = sg.ref_shape(r)
            if _size(s) == N and N > 1:
                setpat(r, ALL)
            elif _size(s) == 1:
                setpat(r, 0)
    changed = True
    while changed:
        changed = False
        for j, o in enumerate(sg.ops):
            if o.op in REDUCE_OPS:
                a = o.args[0]
                if a in pat and j not in pat:
                    changed |= setpat(j, pat[a] & ~_reduced_mask(sg, o, pat[a], rdims))
                continue
            if o.op in VIEW_OPS and o.op != "broadcast_to":
                a = o.args[0]
                if a in pat:
                    changed |= setpat(j, pat[a])
                elif j in pat:
                    changed |= setpat(a, pat[j])
                continue
            # elementwise / broadcast (incl. broadcast_to)
            if j not in pat:
                for a in o.args:
                    if a in pat and sg.ref_shape(a) == tuple(o.shape):
                        changed |= setpat(j, pat[a])
                        break
            if j in pat:
                for a in o.args:
                    changed |= setpat(a, _operand_mask(o, sg.ref_shape(a), pat[j], rdims))
    for j, o in enumerate(sg.ops):
        for r in list(o.args) + [j]:
            if r not in pat:
                raise NotFusible(f"cannot place {sg.ref_shape(r)} in the domain {rdims}")
            _axis_map(sg.ref_shape(r), pat[r], rdims)   # raises if the layout does not fit
    return pat


def _reduced_mask(sg: SubGraph, o, in_pat: int, rdims) -> int:
    """The refined axes reduction ``o`` sums over, for an input spanning ``in_pat``."""
    s = sg.ref_shape(o.args[0])
    am = _axis_map(s, in_pat, rdims)
    red = 0
    for i in _norm_axes(o.attrs.get("axis"), len(s)):
        red |= am[i]
    return red


def _operand_mask(o, s, out_pat: int, rdims) -> int:
    """The refined axes an operand of shape ``s`` spans when broadcast to ``o``'s output (pattern out_pat)."""
    om = _axis_map(o.shape, out_pat, rdims)
    off = len(o.shape) - len(s)
    m = 0
    for i, d in enumerate(s):
        od = o.shape[i + off]
        if d == od:
            if od != 1:
                m |= om[i + off]
        elif d != 1:
            raise NotFusible(f"{o.op}: cannot broadcast {s} to {o.shape}")
    return m


def _reduced_axes(sg: SubGraph, pat: dict, rdims, N: int) -> dict:
    """op index -> refined axes reduced, for every reduction (whose input must span the whole domain)."""
    ALL = (1 << len(rdims)) - 1
    red_of: dict[int, int] = {}
    for j, o in enumerate(sg.ops):
        if o.op in REDUCE_OPS:
            a = o.args[0]
            if pat[a] != ALL and N > 1:
                raise NotFusible("a reduction's input must span the whole domain")
            red_of[j] = _reduced_mask(sg, o, pat[a], rdims)
    return red_of


def _collapse(rdims, pat: dict, red_of: dict):
    """Merge adjacent refined axes every pattern and reduction treats alike: (dims, patterns, reduced axes)
    over the collapsed axes."""
    masks = list(pat.values()) + list(red_of.values())
    groups = [[0]]
    for a in range(1, len(rdims)):
        if all((m >> a & 1) == (m >> (a - 1) & 1) for m in masks):
            groups[-1].append(a)
        else:
            groups.append([a])
    dims = tuple(math.prod(rdims[a] for a in g) for g in groups)

    def cmask(m):
        out = 0
        for k, g in enumerate(groups):
            if m >> g[0] & 1:
                out |= 1 << k
        return out
    return dims, {r: cmask(m) for r, m in pat.items()}, {j: cmask(m) for j, m in red_of.items()}


def _values(sg: SubGraph, dims, cpat: dict, cred: dict):
    """SSA values of the kernel (views are aliases, casts to float are free, scalars are literals) and its
    reductions: (vals, reds, op ref -> value id)."""
    CALL = (1 << len(dims)) - 1
    vals: list[Val] = []
    ref_val: dict[int, int] = {}
    consts: dict[str, int] = {}
    reds: list[Red] = []

    def value_of(ref) -> int:
        if ref in ref_val:
            return ref_val[ref]
        if ref < 0:
            vals.append(Val("in", a=-1 - ref, mask=cpat[ref]))
        ref_val[ref] = len(vals) - 1
        return ref_val[ref]

    for j, o in enumerate(sg.ops):
        if o.op == "const":
            ref_val[j] = _const(vals, consts, float(np.asarray(o.attrs["value"]).reshape(-1)[0]))
            continue
        if o.op in VIEW_OPS:
            ref_val[j] = value_of(o.args[0])
            continue
        if o.op in REDUCE_OPS:
            src = value_of(o.args[0])
            rmask = cred[j]
            if rmask == 0:       # reducing only size-1 axes: the identity
                ref_val[j] = src
                continue
            reds.append(Red(src=src, kind="sum" if o.op == "reduce_sum" else "max", rmask=rmask,
                            kmask=CALL & ~rmask, phase=0, cls="", sfx=0, lanes=1, cross=bool(rmask & 1),
                            consumed=False))
            vals.append(Val("red", a=len(reds) - 1, mask=CALL & ~rmask))
            ref_val[j] = len(vals) - 1
            continue
        args = [value_of(a) for a in o.args]
        op = o.op
        if op == "cast":
            if np.dtype(o.dtype) == BOOL and sg.ref_dtype(o.args[0]) != BOOL:
                op = "tobool"
            else:
                ref_val[j] = args[0]
                continue
        if op == "leaky_relu":
            args = args + [_const(vals, consts, float(np.float32(o.attrs["alpha"])))]
        vals.append(Val("op", op=op, args=tuple(args), mask=cpat[j]))
        ref_val[j] = len(vals) - 1
    return vals, reds, ref_val


def _phases(vals: list, reds: list) -> None:
    """A value is computed in the phase after the last reduction it reads; a reduction a later value reads
    is ``consumed`` (the kernel splits into phases around it)."""
    for v in vals:
        if v.kind == "op":
            v.phase = max([vals[a].phase for a in v.args] or [0])
        elif v.kind == "red":
            r = reds[v.a]
            r.phase = vals[r.src].phase
            v.phase = r.phase + 1
    for v in vals:
        if v.kind == "op":
            for a in v.args:
                if vals[a].kind == "red":
                    reds[vals[a].a].consumed = True


def _outputs(sg: SubGraph, vals, reds, ref_val, cpat, dims, N) -> list:
    """Where each output is written: by its reduction (-2), in the main loop of its phase (full-size
    outputs) or in an epilogue loop over its own axes (-1)."""
    CALL = (1 << len(dims)) - 1
    outs: list[Out] = []
    for k, ref in enumerate(sg.outputs):
        v = ref_val[ref]
        dt, shape, val = sg.ref_dtype(ref), sg.ref_shape(ref), vals[v]
        omask = cpat[ref]          # the output's own pattern (a view may broadcast its value)
        if val.kind == "red" and omask == val.mask and reds[val.a].out < 0 and not sg.inplace:
            reds[val.a].out = k
            outs.append(Out(val=v, u8=False, mask=omask, phase=-2, shape=shape, red=val.a))
        elif omask == CALL and N > 1:
            outs.append(Out(val=v, u8=dt == BOOL, mask=omask, phase=val.phase, shape=shape))
        else:
            outs.append(Out(val=v, u8=dt == BOOL, mask=omask, phase=-1, shape=shape))
    if sg.inplace:
        if reds:
            raise NotFusible("in-place kernels are elementwise")
        if outs[0].phase == -2:
            raise NotFusible("in-place output of a reduction")
    return outs


def _classify_reductions(reds: list, dims) -> None:
    """S1: reduces a suffix of the axes (a register accumulator per row); S2: a scattered accumulator.
    Eight lanes when the innermost axis is reduced and long enough."""
    K = len(dims)
    CALL = (1 << K) - 1
    for r in reds:
        sfx = next((s for s in range(K) if r.rmask == (CALL & ~((1 << s) - 1))), None)
        r.cls = "S1" if sfx is not None else "S2"
        r.sfx = sfx if sfx is not None else -1
        r.lanes = LANES if (r.rmask >> (K - 1) & 1) and dims[-1] >= 16 else 1


def _chunks(dims, reds, nphases: int, mode: str):
    """(rows of axis 0 per chunk, number of chunks): cache-sized, at least ~8 chunks for two threads, and
    few enough that the per-chunk partials of reductions over axis 0 stay within CROSS_BUDGET."""
    K = len(dims)
    row = _size(dims[1:])
    target = PHASED_CHUNK_ELEMS if (nphases > 1 and mode == "local") else CHUNK_ELEMS
    c0 = max(1, target // row) if K > 1 else target
    c0 = min(c0, dims[0])
    if dims[0] >= 16 and K > 1:
        c0 = min(c0, -(-dims[0] // 8))   # at least ~8 chunks to balance two threads
    probe = Plan(dims, mode, c0, 1, [], [], [], reds, [], nphases, False)
    cross_bytes = sum(probe.mask_size(r.kmask) * r.lanes * 8 for r in reds if r.cls == "S2" and r.cross)
    if cross_bytes:
        max_chunks = min(MAX_CHUNKS_CROSS, max(1, CROSS_BUDGET // cross_bytes))
        while -(-dims[0] // c0) > max_chunks:
            c0 *= 2
        c0 = min(c0, dims[0])
    return c0, -(-dims[0] // c0)


def _phase_work(plan: Plan, N: int) -> None:
    """The values each phase and each epilogue evaluates (dependency closures), and the flop count."""
    vals = plan.vals

    def closure(roots):
        need, stack = set(), list(roots)
        while stack:
            v = stack.pop()
            if v in need:
                continue
            need.add(v)
            if vals[v].kind == "op":
                stack.extend(vals[v].args)
        return sorted(need)

    plan.phase_vals = [closure([r.src for r in plan.reds if r.phase == p] + [o.val for o in plan.outs if o.phase == p])
                       for p in range(plan.nphases)]
    plan.epi_vals = [closure([o.val]) if o.phase == -1 else [] for o in plan.outs]
    fl = sum(sum(1 for v in vs if vals[v].kind == "op") * N for vs in plan.phase_vals)
    plan.flops = int(fl + N * len(plan.reds))


def _const(vals, consts, c) -> int:
    key = float(np.float32(c)).hex()
    if key not in consts:
        vals.append(Val("const", c=float(np.float32(c)), mask=0))
        consts[key] = len(vals) - 1
    return consts[key]


def _norm_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)):
        axis = (int(axis),)
    return tuple(sorted({int(a) % ndim for a in axis})) if ndim else ()
