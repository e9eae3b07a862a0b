"""Group fusible nodes and outline each group as ``fused`` / ``fused_assign`` nodes (Graph -> Graph).

Grouping (XLA loop + input fusion, TVM's elementwise / broadcast / injective / reduction patterns):

* fusible: the primitives the kernel language covers (``codegen.subgraph.FUSIBLE_OPS``: elementwise, broadcast,
  reshape-like views and sum / max reductions) on float32 / bool tensors. Matmul, conv, gather,
  pooling, one-hot, random sources, copies and effects are never members (opaque);
* every fusible node starts as its own group; in topological order each producer -> consumer edge
  between two groups is merged when both are in the same training phase and on the same target,
  the merged group still maps onto one iteration domain (``codegen.schedule.analyze``: broadcasts by index
  arithmetic, every reduction's input spanning the whole domain), and the merge creates no cycle:
  no path may leave the group and come back, through other nodes *or other groups* (checked by a
  bounded search over data edges and the ordering constraints below);
* ordering constraints: in-place updates must keep their order with the variable's readers
  (a reader before an ``assign`` reads the old value, one after it the new value), and random
  sources sharing a generator keep their order; these are extra edges for the cycle check and for
  scheduling, so ``order_effects`` (which runs next) derives the same program from the new order.

Outlining a group (the IR is single-output):

* a ``matmul`` / ``batch_matmul`` whose only reader in the outlined graph is one ``fused`` kernel becomes
  its prologue (TVM's out-elementwise-fusable pattern, TorchInductor's GEMM + epilogue): the library GEMM
  writes into a recycled buffer and the group runs right after it in the same task. This is decided
  after outlining, when every reader is known: a view of the GEMM exported to an outside consumer, or an
  in-place kernel of the same group reading it, keeps the GEMM a node of its own. The other large GEMMs
  become ``fused_gemm`` nodes (the same library call, into the kernel runtime's recycled buffers);
* outputs = members used outside the group or as graph outputs. One output: the ``fused`` node *is*
  it. Several: the ``fused`` node returns a tuple and one ``fused_get`` per output unpacks it (one
  kernel launch; the gets are free);
* an ``assign(var, value)`` whose value is computed in the group becomes an in-place output: a
  ``fused_assign`` effect node (inputs[0] = var) whose kernel computes the value's cone elementwise
  straight into the variable's storage. Values of other in-place outputs it needs are read from
  their ``fused_assign`` nodes (the updated variables), reductions from the group's main ``fused``
  node (which runs first). The optimizer's update of a parameter and its two moments becomes three
  in-place kernels and no copies; if a cone would read a variable another in-place output already
  overwrote, the assigns stay ordinary ``assign`` nodes instead.

Nodes are named ``Fused_<Op>_<Op>..._<id>`` and carry ``ann["fused_ops"]`` (the member op types, in
order; the profiler reads it) and ``ann["phase"]`` / ``primitive_target`` of the group.

Stages (``fuse`` calls them in order): ``_facts`` (users, positions, ``_ordering_constraints``), ``_group``
(merging with ``_one_kernel`` and ``_creates_cycle``), ``_worth_a_kernel``, ``_absorbable_assigns``,
``_outline_group`` (``_inplace_plans``, ``_main_kernel`` with its ``fused_get`` outputs, ``_inplace_kernel``),
``_unfused_units`` (large GEMMs as ``fused_gemm``), ``_rewire``, ``_gemm_prologues``, ``_schedule``.

In place: the groups become new nodes, but the nodes left unfused are the graph's own, with their
``inputs`` / ``deps`` rewired to the new producers (``_rewire``); the result is a new ``Graph`` object.
Run it on a copy when the original must survive (``graph_kernel`` clones first).
"""
from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from runtime.codegen.schedule import analyze
from runtime.codegen.subgraph import REDUCE_OPS, VIEW_OPS, NotFusible, op_supported, scalar_const, subgraph_of
from runtime.ir.graph import Graph, IRError, Node
from runtime.ops.registry import get_primitive

LEAVES = ("input", "param", "const")
VIEWS_OF_VAR = {"reshape", "transpose", "expand_dims", "squeeze", "broadcast_to", "slice"}
IDENTITY_VIEWS = {"reshape", "expand_dims", "squeeze"}
MAX_MEMBERS = 400
MAX_INPUTS = 48
MIN_LONE_SIZE = 4096     # a lone elementwise op smaller than this stays a numpy call
GEMM_OPS = ("matmul", "batch_matmul")
GEMM_POOL_BYTES = 1 << 20  # other GEMMs at least this large become fused_gemm (recycled output buffers)


def fuse(graph: Graph) -> Graph:
    """Group, check for cycles, outline (multi-output, in-place assigns), GEMM prologues, schedule."""
    facts = _facts(graph)
    groups = [ms for ms in _group(facts) if _worth_a_kernel(ms)]
    out = _Outline(facts)
    in_group = {m.id: k for k, ms in enumerate(groups) for m in ms}
    absorbed = _absorbable_assigns(facts, in_group)
    for k, ms in enumerate(groups):
        _outline_group(out, ms, absorbed.get(k, []))
    _unfused_units(out, in_group)
    _rewire(out)
    _gemm_prologues(out, {out.producer(n).id for n in graph.outputs.values()})
    result = Graph(graph.name)
    result.nodes = _schedule(out)
    result.outputs = {name: out.producer(n) for name, n in graph.outputs.items()}
    result.effects = [out.replaced.get(e.id, e) for e in graph.effects]
    result.meta = dict(graph.meta)
    return result


# ---------------------------------------------------------------------------------------------------
# facts about the input graph: users, positions, ordering constraints
# ---------------------------------------------------------------------------------------------------
@dataclass
class _Facts:
    nodes: list
    pos: dict                   # node id -> position in the input order
    by_id: dict
    users: dict                 # node id -> nodes reading it
    out_ids: set                # ids of the graph's outputs
    after: dict                 # node id -> nodes that must come after it (ordering constraints)
    effects_on: dict            # variable id -> effect nodes updating it, in order

    def succ(self, n: Node) -> list:
        return self.users.get(n.id, []) + self.after.get(n.id, [])


def _facts(graph: Graph) -> _Facts:
    nodes = list(graph.nodes)
    users: dict[int, list[Node]] = defaultdict(list)
    for n in nodes:
        for i in n.inputs:
            users[i.id].append(n)
    pos = {n.id: k for k, n in enumerate(nodes)}
    after, effects_on = _ordering_constraints(nodes, pos, users)
    return _Facts(nodes, pos, {n.id: n for n in nodes}, users, {n.id for n in graph.outputs.values()},
                  after, effects_on)


def _ordering_constraints(nodes, pos, users):
    """Extra edges (all forward in the input order): an in-place update after every earlier reader of its
    variable (through views) and before every later one, updates of one variable in order, random
    sources sharing a generator in order. Returns (after, effects_on)."""
    after: dict[int, list[Node]] = defaultdict(list)
    effects_on: dict[int, list[Node]] = defaultdict(list)
    for n in nodes:
        for d in n.deps:
            after[d.id].append(n)
        if n.op in LEAVES or get_primitive(n.op).category != "effect":
            continue
        var = n.inputs[0]
        prev = effects_on[var.id]
        if prev:
            after[prev[-1].id].append(n)
        effects_on[var.id].append(n)
        stack, seen = [var], set()
        while stack:
            v = stack.pop()
            for u in users.get(v.id, []):
                if u is n or u.id in seen:
                    continue
                seen.add(u.id)
                if pos[u.id] < pos[n.id]:
                    after[u.id].append(n)
                else:
                    after[n.id].append(u)
                if u.op in VIEWS_OF_VAR:
                    stack.append(u)
    last_rng: dict[int, Node] = {}
    for n in nodes:
        rng = n.attrs.get("_rng")
        if rng is not None:
            if id(rng) in last_rng:
                after[last_rng[id(rng)].id].append(n)
            last_rng[id(rng)] = n
    return after, effects_on


# ---------------------------------------------------------------------------------------------------
# grouping and the cycle check
# ---------------------------------------------------------------------------------------------------
def _fusible(n: Node) -> bool:
    if n.op in LEAVES or n.size == 0:
        return False
    return op_supported(n.op, n.attrs, [i.dtype for i in n.inputs], n.dtype)


def _key(n: Node):
    return (n.ann.get("phase"), n.ann.get("primitive_target"))


class _Groups:
    """Disjoint groups of nodes with their first and last positions (union by size)."""

    def __init__(self, nodes, pos):
        self.pos = pos
        self.gid: dict[int, int] = {}
        self.members: dict[int, list[Node]] = {}
        self.minpos: dict[int, int] = {}
        self.maxpos: dict[int, int] = {}
        for n in nodes:
            self.gid[n.id] = n.id
            self.members[n.id] = [n]
            self.minpos[n.id] = self.maxpos[n.id] = pos[n.id]

    def merge(self, a: int, b: int) -> int:
        if len(self.members[a]) < len(self.members[b]):
            a, b = b, a
        for m in self.members[b]:
            self.gid[m.id] = a
        ms = self.members[a] + self.members.pop(b)
        ms.sort(key=lambda m: self.pos[m.id])
        self.members[a] = ms
        self.minpos[a] = min(self.minpos[a], self.minpos.pop(b))
        self.maxpos[a] = max(self.maxpos[a], self.maxpos.pop(b))
        return a


def _group(facts: _Facts) -> list[list[Node]]:
    """Merge producer -> consumer edges between fusible nodes, in order, when both are in the same phase
    and on the same target, the union stays small, maps onto one iteration domain and closes no cycle."""
    fus = [n for n in facts.nodes if _fusible(n)]
    fus_ids = {n.id for n in fus}
    G = _Groups(fus, facts.pos)
    for n in fus:
        for p in n.inputs:
            if p.id not in fus_ids:
                continue
            ga, gb = G.gid[p.id], G.gid[n.id]
            if ga == gb or _key(p) != _key(n):
                continue
            merged = sorted(G.members[ga] + G.members[gb], key=lambda m: facts.pos[m.id])
            if len(merged) > MAX_MEMBERS or _n_inputs(merged) > MAX_INPUTS:
                continue
            if not _one_kernel(merged) or _creates_cycle(G, ga, gb, facts):
                continue
            G.merge(ga, gb)
    return list(G.members.values())


def _n_inputs(members) -> int:
    ids = {m.id for m in members}
    return len({i.id for m in members for i in m.inputs if i.id not in ids and not scalar_const(i)})


def _one_kernel(members) -> bool:
    """Does the group map onto one iteration domain (``codegen.schedule.analyze`` accepts it)?"""
    try:
        sg, _ = subgraph_of(members, members)
        analyze(sg)
        return True
    except NotFusible:
        return False


def _creates_cycle(G: _Groups, a: int, b: int, facts: _Facts) -> bool:
    """Would merging groups ``a`` and ``b`` close a cycle: a path (data edges or ordering constraints) that
    leaves the union and comes back, through other nodes or other groups (a group is entered whole)?
    The search is bounded by the union's last position: nothing after it can lead back."""
    pos = facts.pos
    union = {m.id for m in G.members[a]} | {m.id for m in G.members[b]}
    limit = max(G.maxpos[a], G.maxpos[b])

    def key(x: Node) -> int:
        g = G.gid.get(x.id)
        return G.minpos[g] if g is not None else pos[x.id]
    stack = [s for m in G.members[a] + G.members[b] for s in facts.succ(m) if s.id not in union and key(s) < limit]
    visited: set[int] = set()
    while stack:
        x = stack.pop()
        if x.id in visited:
            continue
        g = G.gid.get(x.id)
        items = G.members[g] if g is not None else [x]
        for y in items:
            visited.add(y.id)
        for y in items:
            if pos[y.id] >= limit:
                continue
            for s in facts.succ(y):
                if s.id in union:
                    return True
                if s.id not in visited and key(s) < limit:
                    stack.append(s)
    return False


def _worth_a_kernel(members) -> bool:
    """Not a group of views only, nor one small elementwise op (cheaper as a numpy call)."""
    compute = [m for m in members if m.op not in VIEW_OPS]
    if not compute:
        return False
    return not (len(compute) == 1 and compute[0].size < MIN_LONE_SIZE and compute[0].op not in REDUCE_OPS)


# ---------------------------------------------------------------------------------------------------
# outlining: main kernel (multi-output), in-place assigns, views kept for outside readers
# ---------------------------------------------------------------------------------------------------
@dataclass
class _Unit:
    """Nodes scheduled together (a kernel and its ``fused_get`` nodes, or one unfused node) and the input
    graph's nodes they compute (whose ordering constraints they inherit)."""
    nodes: list
    members: list


@dataclass
class _Outline:
    facts: _Facts
    units: list = field(default_factory=list)
    value_of: dict = field(default_factory=dict)         # old node id -> new node producing its value
    unit_of_member: dict = field(default_factory=lambda: defaultdict(list))
    replaced: dict = field(default_factory=dict)         # absorbed assign id -> its fused_assign node
    edges: list = field(default_factory=list)            # extra (unit, unit) order: main kernel first
    view_exports: set = field(default_factory=set)       # view members whose outside users read the view

    def add(self, nodes, members) -> int:
        k = len(self.units)
        self.units.append(_Unit(list(nodes), list(members)))
        for m in members:
            self.unit_of_member[m.id].append(k)
        return k

    def producer(self, x: Node) -> Node:
        return self.value_of.get(x.id, x)


def _absorbable_assigns(facts: _Facts, in_group: dict) -> dict:
    """group -> [(assign, var, value)]: float32 parameter updates (the only update of that variable) whose
    value a kernel group computes, in the same phase and target and of the variable's shape."""
    absorbed: dict[int, list[tuple[Node, Node, Node]]] = defaultdict(list)
    for n in facts.nodes:
        if n.op != "assign":
            continue
        var, val = n.inputs
        k = in_group.get(val.id)
        if k is None or var.op != "param" or var.dtype != np.float32 or len(facts.effects_on[var.id]) != 1:
            continue
        if _key(n) != _key(val) or var.shape != val.shape:
            continue
        absorbed[k].append((n, var, val))
    return absorbed


def _outline_group(out: _Outline, ms: list, inplace: list) -> None:
    facts = out.facts
    mids = {m.id for m in ms}
    plans, need_from_main = _inplace_plans(facts, ms, inplace)
    assign_ids = {a.id for a, *_ in plans}
    ext = {}
    for m in ms:
        us = [u for u in facts.users.get(m.id, []) if u.id not in mids and u.id not in assign_ids]
        if us or m.id in facts.out_ids:
            ext[m.id] = us
    main_outs = [m for m in ms if m.id in ext]
    # a member that only re-views an input (a reshape of it) is not worth a copy: its outside users keep the
    # plain view node
    for m in list(main_outs):
        if m.op in VIEW_OPS and m.op != "broadcast_to" and m.inputs[0].id not in mids:
            main_outs.remove(m)
            out.view_exports.add(m.id)
    main_outs += [r for r in need_from_main if r not in main_outs]
    main_outs.sort(key=lambda m: facts.pos[m.id])
    main_unit = _main_kernel(out, mids, main_outs) if main_outs else None
    for plan in plans:
        u = _inplace_kernel(out, *plan)
        if main_unit is not None:
            out.edges.append((main_unit, u))


def _cone(facts: _Facts, root: Node, member_ids: set, stop: set) -> list[Node]:
    """Members ``root`` depends on (in input order), not looking through the ``stop`` members."""
    need, stack = set(), [root]
    while stack:
        x = stack.pop()
        if x.id in need or x.id not in member_ids:
            continue
        need.add(x.id)
        if x.id in stop and x is not root:
            continue
        stack.extend(x.inputs)
    return [facts.by_id[i] for i in sorted(need, key=lambda i: facts.pos[i])]


def _inplace_plans(facts: _Facts, ms: list, inplace: list):
    """For each absorbed assign, in order: (assign, var, value, body, cut) with ``body`` the value's cone cut
    at other assigned values and at reductions (``cut``: read from their kernels instead). Returns
    ([], []) -- every assign stays an ordinary ``assign`` -- when a body would read a variable an earlier
    in-place kernel already overwrote, alias its own variable through a non-identity view, or not map onto
    one kernel. Also returns the reductions the main kernel must output for the bodies."""
    mids = {m.id for m in ms}
    vals = {v.id for _, _, v in inplace}
    reductions = {m.id for m in ms if m.op in REDUCE_OPS}
    plans, need_from_main, written = [], [], set()
    for a, var, val in sorted(inplace, key=lambda t: facts.pos[t[2].id]):
        stop = (vals - {val.id}) | reductions
        members = _cone(facts, val, mids, stop)
        cut = [m for m in members if m.id in stop and m is not val]
        body = [m for m in members if not (m.id in stop and m is not val)]
        ext_reads = {i.id for m in body for i in m.inputs if i.id not in mids}
        if (ext_reads | _view_roots(facts, ext_reads)) & written:
            return [], []
        if any(_aliases_var(facts.by_id.get(i), var, mids) for i in ext_reads if i in facts.by_id):
            return [], []
        written.add(var.id)
        need_from_main += [c for c in cut if c.op in REDUCE_OPS and c not in need_from_main]
        plans.append((a, var, val, body, cut))
    for a, var, val, body, cut in plans:
        try:
            sg, _ = subgraph_of(body, [val], inplace_var=var, cut={c.id: c for c in cut})
            analyze(sg)
        except NotFusible:
            return [], []
    return plans, need_from_main


def _view_roots(facts: _Facts, ids) -> set:
    """The tensors behind views: reading reshape(v) reads v."""
    roots = set()
    for i in ids:
        x = facts.by_id.get(i)
        while x is not None and x.op in VIEWS_OF_VAR:
            x = x.inputs[0]
        if x is not None:
            roots.add(x.id)
    return roots


def _main_kernel(out: _Outline, mids: set, main_outs: list) -> int:
    """One ``fused`` node computing ``main_outs``; with several outputs a tuple plus one ``fused_get`` each."""
    facts = out.facts
    members, seen = [], set()
    for o in main_outs:
        for m in _cone(facts, o, mids, set()):
            if m.id not in seen:
                seen.add(m.id)
                members.append(m)
    members.sort(key=lambda m: facts.pos[m.id])
    sg, ins = subgraph_of(members, main_outs)
    fnode = Node("fused", list(ins), {"_subgraph": sg}, (0,), np.uint8, scope=_scope(members),
                 ann={**_group_ann(members)})
    shape, dtype = get_primitive("fused").infer([i.shape for i in ins], [i.dtype for i in ins], fnode.attrs)
    fnode.shape, fnode.dtype = tuple(shape), np.dtype(dtype)
    fnode.name = _name(members, fnode.id)
    fnode.ann["fused_ops"] = [m.op for m in members]
    if len(main_outs) == 1:
        out.value_of[main_outs[0].id] = fnode
        return out.add([fnode], members)
    gets = []
    for j, o in enumerate(main_outs):
        g = Node("fused_get", [fnode], {"index": j, "shape": o.shape, "dtype": o.dtype.name}, o.shape, o.dtype,
                 scope=o.scope, ann={k: v for k, v in fnode.ann.items() if k != "fused_ops"})
        g.name = f"{fnode.name}_out{j}"
        gets.append(g)
        out.value_of[o.id] = g
    return out.add([fnode] + gets, members)


def _inplace_kernel(out: _Outline, a: Node, var: Node, val: Node, body: list, cut: list) -> int:
    """A ``fused_assign`` effect computing ``val`` straight into ``var``; it replaces the ``assign``."""
    sg, ins = subgraph_of(body, [val], inplace_var=var, cut={c.id: c for c in cut})
    node = Node("fused_assign", list(ins), {"_subgraph": sg}, var.shape, var.dtype, scope=_scope(body),
                ann={**_group_ann(body)})
    node.name = _name(body, node.id)
    node.ann["fused_ops"] = [m.op for m in body] + ["assign"]
    out.replaced[a.id] = node
    out.value_of[a.id] = node
    out.value_of.setdefault(val.id, node)     # users of the value outside read the updated variable
    return out.add([node], body + [a])


def _unfused_units(out: _Outline, in_group: dict) -> None:
    """Every node no kernel computes is a unit of its own; large float32 GEMMs become ``fused_gemm`` (the
    same library call into recycled output buffers)."""
    for n in out.facts.nodes:
        if (n.id in in_group and n.id not in out.view_exports) or n.id in out.replaced:
            continue
        node = n
        if n.op in GEMM_OPS and n.dtype == np.float32 and n.nbytes >= GEMM_POOL_BYTES:
            node = Node("fused_gemm", list(n.inputs), {"op": n.op, "transpose_a": bool(n.attrs["transpose_a"]),
                                                       "transpose_b": bool(n.attrs["transpose_b"])},
                        n.shape, n.dtype, scope=n.scope, deps=list(n.deps), ann=dict(n.ann))
            node.name = n.name
            out.value_of[n.id] = node
        out.add([node], [n])
        out.value_of.setdefault(n.id, n)


def _rewire(out: _Outline) -> None:
    """Inputs of every unit's nodes read the new producers; members' deps move to the unit's first node.
    (This rewires the unfused nodes of the input graph in place.)"""
    for u in out.units:
        for node in u.nodes:
            if node.op != "fused_get":
                node.inputs = [out.producer(i) for i in node.inputs]
        mset = {m.id for m in u.members}
        u.nodes[0].deps = _dedupe([out.producer(d) for m in u.members for d in m.deps if d.id not in mset])


# ---------------------------------------------------------------------------------------------------
# GEMM prologues
# ---------------------------------------------------------------------------------------------------
def _gemm_prologues(out: _Outline, out_ids: set) -> None:
    """Run a GEMM as the prologue of the ``fused`` kernel that is its only reader in the fused graph.

    Decided on the outlined graph, where every reader of the GEMM's value is known: the main kernel,
    the group's in-place kernels (``fused_assign``), views of it exported to outside consumers and
    unfused nodes. A prologue GEMM has no node of its own, so one more reader of any kind would read a
    value that is not in the graph. Each absorbed GEMM's unit merges into its kernel's unit (its members,
    and so its ordering constraints, move along).
    """
    units = out.units
    readers: dict[int, list[Node]] = defaultdict(list)
    unit_of_node: dict[int, int] = {}
    for k, u in enumerate(units):
        for node in u.nodes:
            unit_of_node[node.id] = k
            for i in _dedupe(list(node.inputs) + list(node.deps)):
                readers[i.id].append(node)
    into: dict[int, int] = {}            # absorbed GEMM unit -> kernel unit
    for k, u in enumerate(units):
        fnode = u.nodes[0]
        if fnode.op != "fused":
            continue
        spec, new_inputs, gemms = [], [], []
        for x in fnode.inputs:
            j = unit_of_node.get(x.id)
            if _prologue_gemm(x, fnode, readers, out_ids) and j is not None and len(units[j].nodes) == 1:
                op = x.attrs["op"] if x.op == "fused_gemm" else x.op
                spec.append((op, bool(x.attrs["transpose_a"]), bool(x.attrs["transpose_b"])))
                new_inputs.extend(x.inputs)
                fnode.deps = _dedupe(fnode.deps + list(x.deps))
                gemms.append(units[j].members[0])
                into[j] = k
            else:
                spec.append(None)
                new_inputs.append(x)
        if not gemms:
            continue
        fnode.inputs = new_inputs
        fnode.attrs["_prologue"] = tuple(spec)
        fnode.name = _name(gemms + u.members, fnode.id)
        fnode.ann["fused_ops"] = [g.op for g in gemms] + list(fnode.ann["fused_ops"])
        u.members = gemms + u.members
    if into:
        _merge_units(out, into)


def _prologue_gemm(x: Node, fnode: Node, readers, out_ids) -> bool:
    """Can GEMM node ``x`` run inside ``fnode``: float32, same phase and target, read by nothing else?"""
    if x.op not in GEMM_OPS and x.op != "fused_gemm":
        return False
    return (x.dtype == np.float32 and x.id not in out_ids and _key(x) == _key(fnode)
            and [r.id for r in readers.get(x.id, [])] == [fnode.id])


def _merge_units(out: _Outline, into: dict) -> None:
    """Drop the units in ``into`` (unit -> the unit that now computes its members) and renumber."""
    renum, kept = {}, []
    for k, u in enumerate(out.units):
        if k not in into:
            renum[k] = len(kept)
            kept.append(u)
    for j, k in into.items():
        renum[j] = renum[k]
    out.units = kept
    out.unit_of_member = defaultdict(list, {mid: list(dict.fromkeys(renum[k] for k in us))
                                            for mid, us in out.unit_of_member.items()})
    out.edges = [(renum[a], renum[b]) for a, b in out.edges if renum[a] != renum[b]]


# ---------------------------------------------------------------------------------------------------
# schedule
# ---------------------------------------------------------------------------------------------------
def _schedule(out: _Outline) -> list[Node]:
    """Kahn's algorithm over units (data edges, the members' ordering constraints, main kernel before its
    in-place kernels), earliest input position first, so the new order stays close to the old one."""
    units, facts = out.units, out.facts
    node_unit = {node.id: k for k, u in enumerate(units) for node in u.nodes}
    preds: list[set] = [set() for _ in units]
    for k, u in enumerate(units):
        for node in u.nodes:
            for i in list(node.inputs) + list(node.deps):
                j = node_unit.get(i.id)
                if j is not None and j != k:
                    preds[k].add(j)
    for n in facts.nodes:
        for s in facts.after.get(n.id, []):
            for a in out.unit_of_member.get(n.id, []):
                for b in out.unit_of_member.get(s.id, []):
                    if a != b:
                        preds[b].add(a)
    for a, b in out.edges:
        preds[b].add(a)
    prio = [min(facts.pos[m.id] for m in u.members) for u in units]
    succs: list[list[int]] = [[] for _ in units]
    indeg = [len(p) for p in preds]
    for k, ps in enumerate(preds):
        for j in ps:
            succs[j].append(k)
    heap = [(prio[k], k) for k in range(len(units)) if indeg[k] == 0]
    heapq.heapify(heap)
    order: list[Node] = []
    done = 0
    while heap:
        _, k = heapq.heappop(heap)
        done += 1
        order.extend(units[k].nodes)
        for s in succs[k]:
            indeg[s] -= 1
            if indeg[s] == 0:
                heapq.heappush(heap, (prio[s], s))
    if done != len(units):
        raise IRError("graph-kernel fusion produced a cyclic schedule")
    return order


# ---------------------------------------------------------------------------------------------------
# names and annotations
# ---------------------------------------------------------------------------------------------------
def _camel(op: str) -> str:
    return "".join(p.capitalize() for p in op.split("_"))


def _name(members: list[Node], nid: int, prefix="Fused") -> str:
    seen, parts = set(), []
    for m in members:
        if m.op in VIEW_OPS or m.op == "const" or m.op in seen:
            continue
        seen.add(m.op)
        parts.append(_camel(m.op))
    if not parts:
        parts = [_camel(members[-1].op)]
    if len(parts) > 5:
        parts = parts[:5] + ["Etc"]
    return f"{prefix}_{'_'.join(parts)}_{nid}"


def _scope(members: list[Node]) -> str:
    scopes = [m.scope.split("/") for m in members if m.scope]
    if not scopes:
        return ""
    common = scopes[0]
    for s in scopes[1:]:
        k = 0
        while k < min(len(common), len(s)) and common[k] == s[k]:
            k += 1
        common = common[:k]
    return "/".join(common) if common else "/".join(scopes[-1])


def _dedupe(xs):
    seen, out = set(), []
    for x in xs:
        if x.id not in seen:
            seen.add(x.id)
            out.append(x)
    return out


def _group_ann(members):
    ann = {}
    for k in ("phase", "primitive_target"):
        v = members[-1].ann.get(k)
        if v is not None:
            ann[k] = v
    src = sorted({m.ann["expanded_from"] for m in members if "expanded_from" in m.ann})
    if src:
        ann["fused_from"] = src
    return ann


def _aliases_var(x: Node | None, var: Node, member_ids) -> bool:
    """Is ``x`` a non-identity view (transpose, slice, broadcast) of ``var``'s storage?"""
    if x is None or x.id in member_ids:
        return False
    chain_ok = True
    while x is not None and x.op in VIEWS_OF_VAR:
        if x.op not in IDENTITY_VIEWS:
            chain_ok = False
        x = x.inputs[0]
    return x is var and not chain_ok
