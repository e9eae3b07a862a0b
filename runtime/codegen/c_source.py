"""C source for a kernel ``Plan``: one function, one pass over memory in cache-sized chunks of
domain axis 0, OpenMP over the chunks, every value an inline scalar expression (so no temporary
array is ever allocated). The element functions are branch-free (``element_ops.h``) and every innermost
loop whose iterations are independent -- elementwise work, the 8 lanes of a reduction, accumulators
indexed by the innermost axis -- carries ``#pragma omp simd``, so gcc vectorises it (``-march=native``)
whatever its cost model says; a loop accumulating into one scalar keeps its sequential order.

Signature of the generated function::

    void fk_<hash>(void **P, const int64_t *D, int64_t c0, int64_t nch, int nth)

``P`` = [inputs..., outputs..., reduction results (float*) ..., reduction scratch (double*) ...],
``D`` = the domain's sizes (the code is generic in them: one compiled kernel serves every shape
with the same structure), ``c0`` = rows of axis 0 per chunk, ``nch`` = number of chunks.
The loop order and the accumulation order are exactly those of the Cython interpreter
(``runtime/_fusion.pyx``), which is what makes the two bit-identical.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

from runtime.codegen.schedule import LANES, Plan
from runtime.codegen.subgraph import BINARY, TERNARY, UNARY

_TEMPLATES = {**UNARY, **BINARY, **TERNARY}


def c_float(x: float) -> str:
    x = float(np.float32(x))
    if math.isnan(x):
        return "NAN"
    if math.isinf(x):
        return "INFINITY" if x > 0 else "(-INFINITY)"
    return f"{x.hex()}f"


class _W:
    def __init__(self):
        self.lines: list[str] = []
        self.ind = 1

    def __call__(self, s: str = ""):
        self.lines.append("    " * self.ind + s if s else "")

    def open(self, s: str):
        self(s + " {")
        self.ind += 1

    def close(self, s: str = "}"):
        self.ind -= 1
        self(s)


def generate(plan: Plan) -> tuple[str, str]:
    """(function name, C source of the function without the shared header)."""
    body = _gen(plan, "FKNAME")
    h = hashlib.sha1(body.encode()).hexdigest()[:20]
    name = f"fk_{h}"
    return name, body.replace("FKNAME", name)


def _gen(plan: Plan, name: str) -> str:
    return _Emitter(plan).function(name)


_IDENT = {"sum": "0.0", "max": "(-INFINITY)"}


class _Emitter:
    """Writes the C function of one plan: declarations, per-mask strides, then the streaming path (flat
    elementwise kernels), the chunk loop of the "local" or "global" mode, and the epilogues (outputs
    smaller than the domain). Each method emits one part; the loop order and the accumulation order are
    those of the interpreter."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.K = plan.K
        self.vals, self.reds, self.outs = plan.vals, plan.reds, plan.outs
        self.R = "" if plan.inplace else " restrict"
        self.full = (1 << self.K) - 1
        self.ROW = " * ".join(f"D{a}" for a in range(1, self.K)) or "1"
        self.w = _W()
        self.need_of, self.cload, self.cstore = _plan_cache(plan)
        self.cached = sorted({v for vs in self.cstore.values() for v in vs})
        self.sign = _signs(plan)
        self.defined = None      # values declared in the loop being written (None: its whole closure)

    def function(self, name: str) -> str:
        self.declarations()
        self.strides()
        if self.streamable():
            self.stream_path()
        if self.plan.mode == "local":
            self.local_mode()
        else:
            self.global_mode()
        self.epilogues()
        head = [f"void {name}(void **P, const int64_t *D, int64_t c0, int64_t nch, int nth)", "{"]
        return "\n".join(head + self.w.lines + ["}", ""])

    # -- declarations --------------------------------------------------------------------------------------
    def declarations(self):
        w, plan, K, R = self.w, self.plan, self.K, self.R
        n_in, n_out, n_red = len(plan.in_masks), len(self.outs), len(self.reds)
        for a in range(K):
            w(f"const int64_t D{a} = D[{a}];")
        w("const int64_t NTOT = " + " * ".join(f"D{a}" for a in range(K)) + ";")
        w("(void)NTOT; (void)c0; (void)nch; (void)nth;")
        for k in range(n_in):
            t = "unsigned char" if plan.in_u8[k] else "float"
            w(f"const {t} *{R} in{k} = (const {t} *)P[{k}];")
        for k, o in enumerate(self.outs):
            if o.phase == -2:
                continue
            t = "unsigned char" if o.u8 else "float"
            w(f"{t} *{R} out{k} = ({t} *)P[{n_in + k}];")
        for r in range(n_red):
            w(f"float *{R} res{r} = (float *)P[{n_in + n_out + r}];")
            w(f"double *{R} acc{r} = (double *)P[{n_in + n_out + n_red + r}];")
            w(f"(void)res{r}; (void)acc{r};")

    def strides(self):
        """s<mask>_<axis> (element strides of a value spanning mask) and n<mask> (its size)."""
        w, K = self.w, self.K
        masks = {v.mask for v in self.vals if v.kind in ("in", "red")}
        masks |= {r.kmask for r in self.reds}
        masks.add(self.full)
        masks |= {o.mask for o in self.outs}
        for m in sorted(masks):
            for a in range(K):
                if m >> a & 1:
                    inner = [f"D{b}" for b in range(a + 1, K) if m >> b & 1]
                    w(f"const int64_t s{m}_{a} = {' * '.join(inner) if inner else '1'};")
                else:
                    w(f"const int64_t s{m}_{a} = 0;")
            w(f"(void)s{m}_0;")
            sz = " * ".join(f"D{a}" for a in range(K) if m >> a & 1) or "1"
            w(f"const int64_t n{m} = {sz}; (void)n{m};")

    # -- expressions -----------------------------------------------------------------------------------------
    def acc_stmt(self, r, v, lane):
        rd, K = self.reds[r], self.K
        x = f"(double)v{v}"
        if rd.cls == "S1":
            tgt = f"A{r}[{lane}]" if rd.lanes == LANES else f"A{r}"
        else:
            if rd.lanes == LANES:
                tgt = f"acp{r}[o{rd.kmask} * 8 + {lane}]"
            elif rd.kmask >> (K - 1) & 1:
                tgt = f"acp{r}[o{rd.kmask} + jj]" if K > 1 else f"acp{r}[jj]"
            else:
                tgt = f"acp{r}[o{rd.kmask}]"
        if rd.kind == "sum":
            return f"{tgt} += {x};"
        if rd.cls == "S1":     # max is exact: float lanes (same result as the interpreter's doubles)
            return f"{tgt} = fk_max({tgt}, v{v});"
        return f"{tgt} = fk_dmax({tgt}, {x});"

    def load(self, v):
        val, K = self.vals[v], self.K
        if val.kind == "const":
            return c_float(val.c)
        m = val.mask
        if K == 1:
            idx = "jj" if m & 1 else "0"
        else:
            idx = f"o{m} + jj" if m >> (K - 1) & 1 else f"o{m}"
        if val.kind == "in":
            e = f"in{val.a}[{idx}]"
            return f"(float){e}" if self.plan.in_u8[val.a] else e
        return f"res{val.a}[{idx}]"

    def expr(self, v):
        vals = self.vals
        val = vals[v]
        if val.kind != "op":
            return self.load(v)
        args = [f"v{a}" for a in val.args]
        c = vals[val.args[0]] if val.op == "select" else None
        if c is not None and c.kind == "op" and c.op in _CMP and self.declared(*c.args):
            # select on a comparison: one blend on the compare mask (when the comparison's operands are in
            # this loop: a comparison loaded from the chunk cache left them behind in an earlier phase)
            return f"fk_sel(v{c.args[0]} {_CMP[c.op]} v{c.args[1]}, {args[1]}, {args[2]})"
        if val.op == "exp" and self.sign.get(val.args[0]) == -1:
            return f"fk_exp_nonpos({args[0]})"   # same values: the overflow clamp can never apply
        return _TEMPLATES[val.op].format(*args)

    def declared(self, *vs) -> bool:
        return self.defined is None or all(v in self.defined for v in vs)

    # -- loops -----------------------------------------------------------------------------------------------
    def body(self, need, stores, accs, lane, p=None):
        w, K = self.w, self.K
        loads, keep = self.cload.get(p, set()), self.cstore.get(p, set())
        self.defined = set(need)
        cidx = (f"o{self.full} - a * ({self.ROW}) + jj" if K > 1 else "jj - a")
        for v in need:
            if v in loads:
                w(f"const float v{v} = sc{v}[{cidx}];")
            else:
                w(f"const float v{v} = {self.expr(v)};")
            if v in keep:
                w(f"sc{v}[{cidx}] = v{v};")
        for k in stores:
            o = self.outs[k]
            idx = f"o{self.full} + jj" if K > 1 else "jj"
            if o.u8:
                w(f"out{k}[{idx}] = (unsigned char)(v{o.val} != 0.0f);")
            else:
                w(f"out{k}[{idx}] = v{o.val};")
        for r in accs:
            w(self.acc_stmt(r, self.reds[r].src, lane))

    def offsets(self, used_masks, levels):
        """o<m> = sum_{a < levels} i_a * s<m>_a."""
        for m in sorted(used_masks):
            terms = [f"i{a} * s{m}_{a}" for a in range(levels) if m >> a & 1]
            self.w(f"const int64_t o{m} = {' + '.join(terms) if terms else '0'}; (void)o{m};")

    def independent(self, accs) -> bool:
        """Do the iterations of the innermost loop touch disjoint accumulators (none, or S2 accumulators
        indexed by the innermost axis)? Then ``#pragma omp simd`` cannot change the accumulation order."""
        K = self.K
        return all(self.reds[r].cls == "S2" and self.reds[r].lanes == 1 and self.reds[r].kmask >> (K - 1) & 1
                   for r in accs)

    def inner_loop(self, need, stores, accs, j0, j1, p=None):
        w = self.w
        if any(self.reds[r].lanes == LANES for r in accs):
            w("{")
            w.ind += 1
            w(f"int64_t j = {j0};")
            w.open(f"for (; j + 8 <= {j1}; j += 8)")
            w("#pragma omp simd")          # lane l accumulates into its own partial: order kept per lane
            w.open("for (int l = 0; l < 8; l++)")
            w("const int64_t jj = j + l;")
            self.body(need, stores, accs, "l", p)
            w.close()
            w.close()
            w.open(f"for (int l = 0; j < {j1}; j++, l++)")
            w("const int64_t jj = j;")
            self.body(need, stores, accs, "l", p)
            w.close()
            w.ind -= 1
            w("}")
        else:
            if self.independent(accs):
                w("#pragma omp simd")
            w.open(f"for (int64_t jj = {j0}; jj < {j1}; jj++)")
            self.body(need, stores, accs, "0", p)
            w.close()

    def used_masks(self, need, stores, accs):
        ms = {self.vals[v].mask for v in need if self.vals[v].kind in ("in", "red")}
        if stores:
            ms.add(self.full)
        ms |= {self.reds[r].kmask for r in accs if self.reds[r].cls == "S2"}
        return ms

    def s1_decl(self, r):
        rd = self.reds[r]
        t = "double" if rd.kind == "sum" else "float"
        if rd.lanes == LANES:
            self.w(f"{t} A{r}[8] = {{{', '.join([_IDENT[rd.kind]] * 8)}}};")
        else:
            self.w(f"{t} A{r} = {_IDENT[rd.kind]};")

    def s1_final(self, r):
        rd = self.reds[r]
        tree = "fk_tree_sum" if rd.kind == "sum" else "fk_tree_maxf"
        return f"{tree}(A{r})" if rd.lanes == LANES else f"A{r}"

    def phase_loops(self, p):
        """The loop nest of phase p over one chunk [a, b) of axis 0: S1 accumulators open and close at the
        axis where their reduced suffix starts."""
        w, K, reds = self.w, self.K, self.reds
        need = self.need_of[p]
        stores = [k for k, o in enumerate(self.outs) if o.phase == p]
        accs = [r for r, rd in enumerate(reds) if rd.phase == p]
        ms = self.used_masks(need, stores, accs)
        if self.cload.get(p) or self.cstore.get(p):
            ms.add(self.full)
        s1_at = {}
        for r in accs:
            if reds[r].cls == "S1":
                s1_at.setdefault(reds[r].sfx, []).append(r)
        for r in s1_at.get(0, []):
            self.s1_decl(r)
        if K == 1:
            self.inner_loop(need, stores, accs, "a", "b", p)
        else:
            for a in range(K - 1):
                lo = "a" if a == 0 else "0"
                hi = "b" if a == 0 else f"D{a}"
                w.open(f"for (int64_t i{a} = {lo}; i{a} < {hi}; i{a}++)")
                for r in s1_at.get(a + 1, []):
                    self.s1_decl(r)
            self.offsets(ms, K - 1)
            self.inner_loop(need, stores, accs, "0", f"D{K - 1}", p)
            for a in reversed(range(K - 1)):
                for r in s1_at.get(a + 1, []):
                    rd = reds[r]
                    terms = [f"i{b} * s{rd.kmask}_{b}" for b in range(a + 1) if rd.kmask >> b & 1]
                    w(f"res{r}[{' + '.join(terms) if terms else '0'}] = (float){self.s1_final(r)};")
                w.close()
        for r in s1_at.get(0, []):
            w(f"acc{r}[ch] = {self.s1_final(r)};")

    # -- reductions ------------------------------------------------------------------------------------------
    def s2_setup(self, p, chunk_local):
        """Pointers (and, in local mode, initialisation) of the S2 accumulators of phase p."""
        w, R = self.w, self.R
        for r, rd in enumerate(self.reds):
            if rd.phase != p or rd.cls != "S2":
                continue
            per = f"n{rd.kmask} * {rd.lanes}"
            if rd.cross:
                w(f"double *{R} acp{r} = acc{r} + ch * ({per});")
                if chunk_local:
                    w(f"for (int64_t e = 0; e < {per}; e++) acp{r}[e] = {_IDENT[rd.kind]};")
            else:
                w(f"double *{R} acp{r} = acc{r};")
                if chunk_local:
                    row = f"(n{rd.kmask} / D0) * {rd.lanes}"
                    w(f"for (int64_t e = a * {row}; e < b * {row}; e++) acp{r}[e] = {_IDENT[rd.kind]};")

    def s2_finalize_rows(self, p):
        """Local mode: S2 reductions keeping axis 0 finish with the chunk's rows."""
        w = self.w
        for r, rd in enumerate(self.reds):
            if rd.phase != p or rd.cls != "S2" or rd.cross:
                continue
            row = f"(n{rd.kmask} / D0)"
            w.open(f"for (int64_t e = a * {row}; e < b * {row}; e++)")
            w(f"res{r}[e] = (float){_lane_sum(rd, f'acc{r}', 'e')};")
            w.close()

    def combine(self, r):
        """The result of reduction r from its per-chunk (or per-lane) partials, in chunk order."""
        w, rd = self.w, self.reds[r]
        comb = "+" if rd.kind == "sum" else None
        if rd.cls == "S1":
            w("{")
            w.ind += 1
            w(f"double t = {_IDENT[rd.kind]};")
            w.open("for (int64_t c = 0; c < nch; c++)")
            w(f"t = t + acc{r}[c];" if comb else f"t = fk_dmax(t, acc{r}[c]);")
            w.close()
            w(f"res{r}[0] = (float)t;")
            w.ind -= 1
            w("}")
            return
        per = f"(n{rd.kmask} * {rd.lanes})"
        if rd.cross:
            w.open(f"for (int64_t e = 0; e < n{rd.kmask}; e++)")
            w(f"double t = {_IDENT[rd.kind]};")
            w.open("for (int64_t c = 0; c < nch; c++)")
            x = _lane_sum(rd, f"(acc{r} + c * {per})", "e")
            w(f"t = t + {x};" if comb else f"t = fk_dmax(t, {x});")
            w.close()
            w(f"res{r}[e] = (float)t;")
            w.close()
        else:
            w.open(f"for (int64_t e = 0; e < n{rd.kmask}; e++)")
            w(f"res{r}[e] = (float){_lane_sum(rd, f'acc{r}', 'e')};")
            w.close()

    # -- the three loop structures -----------------------------------------------------------------------------
    def streamable(self) -> bool:
        plan, outs = self.plan, self.outs
        return (self.K == 1 and not self.reds and plan.nphases == 1 and not plan.inplace and bool(outs)
                and all(o.phase == 0 and not o.u8 for o in outs))

    def stream_path(self):
        """Large flat elementwise kernels: tiles of 64 computed in registers, written with non-temporal
        stores (no read-for-ownership of the output, no cache pollution)."""
        w, outs = self.w, self.outs
        w(f"if (NTOT * {4 * len(outs)} >= (int64_t){STREAM_BYTES}) {{")
        w.ind += 1
        w(f"#pragma omp parallel for schedule(dynamic, 1) {_PAR}")
        w.open("for (int64_t ch = 0; ch < nch; ch++)")
        w("const int64_t a = ch * c0, b = (a + c0 < D0) ? a + c0 : D0;")
        w.open("for (int64_t j = a; j < b; j += 64)")
        w("const int64_t m = (b - j < 64) ? b - j : 64;")
        for k in range(len(outs)):
            w(f"float t{k}[64];")
        w("#pragma omp simd")
        w.open("for (int64_t q = 0; q < m; q++)")
        w("const int64_t jj = j + q;")
        self.defined = set(self.plan.phase_vals[0])
        for v in self.plan.phase_vals[0]:
            w(f"const float v{v} = {self.expr(v)};")
        for k, o in enumerate(outs):
            w(f"t{k}[q] = v{o.val};")
        w.close()
        for k in range(len(outs)):
            w(f"fk_stream(out{k} + j, t{k}, m);")
        w.close()
        w.close()
        w("fk_sfence();")
        w("return;")
        w.ind -= 1
        w("}")

    def local_mode(self):
        """One parallel loop over chunks of axis 0; every phase runs on the chunk before the next chunk."""
        w, plan = self.w, self.plan
        if plan.nphases and any(plan.phase_vals):
            w(f"#pragma omp parallel {_PAR}")
            w.open("")
            for v in self.cached:
                w(f"float *sc{v} = (float *)malloc(sizeof(float) * c0 * ({self.ROW}));")
            w("#pragma omp for schedule(dynamic, 1)")
            w.open("for (int64_t ch = 0; ch < nch; ch++)")
            w("const int64_t a = ch * c0, b = (a + c0 < D0) ? a + c0 : D0;")
            for p in range(plan.nphases):
                if not plan.phase_vals[p]:
                    continue
                w.open("")
                self.s2_setup(p, True)
                self.phase_loops(p)
                self.s2_finalize_rows(p)
                w.close()
            w.close()
            for v in self.cached:
                w(f"free(sc{v});")
            w.close()
        for r, rd in enumerate(self.reds):
            if rd.cross:
                self.combine(r)

    def global_mode(self):
        """One parallel pass over the whole domain per phase, reductions combined between phases."""
        w, plan = self.w, self.plan
        for p in range(plan.nphases):
            if not plan.phase_vals[p]:
                continue
            for r, rd in enumerate(self.reds):
                if rd.phase == p and rd.cls == "S2":
                    n = f"n{rd.kmask} * {rd.lanes}" + (" * nch" if rd.cross else "")
                    w(f"for (int64_t e = 0; e < {n}; e++) acc{r}[e] = {_IDENT[rd.kind]};")
            w(f"#pragma omp parallel for schedule(dynamic, 1) {_PAR}")
            w.open("for (int64_t ch = 0; ch < nch; ch++)")
            w("const int64_t a = ch * c0, b = (a + c0 < D0) ? a + c0 : D0;")
            self.s2_setup(p, False)
            self.phase_loops(p)
            w.close()
            for r, rd in enumerate(self.reds):
                if rd.phase == p and (rd.cross or rd.cls == "S2"):
                    self.combine(r)

    def epilogues(self):
        """Outputs smaller than the domain: a loop nest over their own axes after the main loops."""
        w, K = self.w, self.K
        for k, o in enumerate(self.outs):
            if o.phase != -1:
                continue
            need = self.plan.epi_vals[k]
            self.defined = set(need)
            w.open("")
            ms = self.used_masks(need, [], [])
            ms.add(o.mask)
            if K == 1:
                hi = "D0" if o.mask & 1 else "1"
                w("#pragma omp simd")
                w.open(f"for (int64_t jj = 0; jj < {hi}; jj++)")
            else:
                for a in range(K - 1):
                    hi = f"D{a}" if o.mask >> a & 1 else "1"
                    w.open(f"for (int64_t i{a} = 0; i{a} < {hi}; i{a}++)")
                self.offsets(ms, K - 1)
                hi = f"D{K - 1}" if o.mask >> (K - 1) & 1 else "1"
                w("#pragma omp simd")
                w.open(f"for (int64_t jj = 0; jj < {hi}; jj++)")
            for v in need:
                w(f"const float v{v} = {self.expr(v)};")
            m = o.mask
            if K == 1:
                idx = "jj" if m & 1 else "0"
            else:
                idx = f"o{m} + jj" if m >> (K - 1) & 1 else f"o{m}"
            if o.u8:
                w(f"out{k}[{idx}] = (unsigned char)(v{o.val} != 0.0f);")
            else:
                w(f"out{k}[{idx}] = v{o.val};")
            w.close()
            if K > 1:
                for _ in range(K - 1):
                    w.close()
            w.close()


_PAR = "if (nch > 1 && nth > 1 && NTOT >= 65536) num_threads(nth)"


def _lane_sum(rd, base: str, e: str) -> str:
    if rd.lanes == LANES:
        tree = "fk_tree_sum" if rd.kind == "sum" else "fk_tree_max"
        return f"{tree}({base} + {e} * 8)"
    return f"{base}[{e}]"


_EXPENSIVE = {"exp", "log", "tanh", "sigmoid", "div", "sqrt", "rsqrt", "reciprocal"}
CACHE_LIMIT = 1 << 16      # elements per chunk above which values are recomputed instead
STREAM_BYTES = 24 << 20    # output bytes above which flat elementwise kernels use streaming stores


def _plan_cache(plan: Plan):
    """Local mode: values computed in one phase and needed again in a later one are kept in a
    per-thread chunk buffer (cache-resident) instead of being recomputed, when that saves work.

    Returns (values to evaluate per phase, values loaded from the buffer per phase, values stored
    per phase). Recomputing or caching gives the same bits; the interpreter always recomputes.
    """
    vals = plan.vals
    K = plan.K
    full = (1 << K) - 1
    need_of = {p: list(vs) for p, vs in enumerate(plan.phase_vals)}
    row = int(np.prod(plan.dims[1:], dtype=np.int64)) if K > 1 else 1
    if plan.mode != "local" or plan.nphases < 2 or plan.c0 * row > CACHE_LIMIT:
        return need_of, {}, {}
    cost: dict[int, int] = {}
    for i, v in enumerate(vals):
        if v.kind == "op":
            cost[i] = (6 if v.op in _EXPENSIVE else 1) + sum(cost[a] for a in v.args)
        elif v.kind == "in":
            cost[i] = 1 if v.mask == full else 0
        else:
            cost[i] = 0
    computed_in: dict[int, int] = {}
    cload: dict[int, set] = {}
    cstore: dict[int, set] = {}
    for p in range(plan.nphases):
        roots = [r.src for r in plan.reds if r.phase == p] + [o.val for o in plan.outs if o.phase == p]
        if not roots:
            need_of[p] = []
            continue
        cand = {v for v in computed_in if vals[v].kind == "op" and vals[v].mask == full and cost[v] >= 3}
        need, stack = set(), list(roots)
        while stack:
            v = stack.pop()
            if v in need:
                continue
            need.add(v)
            if v in cand:
                continue
            if vals[v].kind == "op":
                stack.extend(vals[v].args)
        loads = need & cand
        for v in loads:
            cstore.setdefault(computed_in[v], set()).add(v)
        cload[p] = loads
        for v in need - loads:
            computed_in.setdefault(v, p)
        need_of[p] = sorted(need)
    return need_of, cload, cstore


_CMP = {"equal": "==", "not_equal": "!=", "less": "<", "less_equal": "<=", "greater": ">", "greater_equal": ">="}


def _signs(plan: Plan) -> dict[int, int]:
    """Values known to be >= 0 (+1) or <= 0 (-1) (NaN aside), for cheaper exps."""
    vals = plan.vals
    sg: dict[int, int] = {}
    for i, v in enumerate(vals):
        if v.kind == "const":
            sg[i] = 1 if v.c >= 0 else (-1 if v.c <= 0 else 0)
            if v.c == 0:
                sg[i] = 1
            continue
        if v.kind != "op":
            continue
        a = [sg.get(x, 0) for x in v.args]
        if v.op in ("abs", "square", "relu", "exp", "sqrt", "sigmoid", "rsqrt"):
            sg[i] = 1
        elif v.op == "neg":
            sg[i] = -a[0]
        elif v.op == "mul":
            if v.args[0] == v.args[1]:
                sg[i] = 1
            elif a[0] and a[1]:
                sg[i] = a[0] * a[1]
        elif v.op == "sub":
            x, m = v.args
            if vals[m].kind == "red" and plan.reds[vals[m].a].kind == "max" and plan.reds[vals[m].a].src == x:
                sg[i] = -1           # x - max(x) over the reduced axes
            elif a[0] == -1 and a[1] == 1:
                sg[i] = -1
        elif v.op == "add" and a[0] == a[1] and a[0]:
            sg[i] = a[0]
    return sg
