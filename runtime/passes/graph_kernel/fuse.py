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
"""
from __future__ import annotations

import heapq
from collections import defaultdict

import numpy as np

from runtime.ir.graph import Graph, IRError, Node
from runtime.ops.registry import get_primitive
from runtime.codegen.schedule import analyze
from runtime.codegen.subgraph import REDUCE_OPS, VIEW_OPS, NotFusible, op_supported, scalar_const, subgraph_of

LEAVES = ("input", "param", "const")
VIEWS_OF_VAR = {"reshape", "transpose", "expand_dims", "squeeze", "broadcast_to", "slice"}
IDENTITY_VIEWS = {"reshape", "expand_dims", "squeeze"}
MAX_MEMBERS = 400
MAX_INPUTS = 48
MIN_LONE_SIZE = 4096     # a lone elementwise op smaller than this stays a numpy call
GEMM_OPS = ("matmul", "batch_matmul")
GEMM_POOL_BYTES = 1 << 20  # other GEMMs at least this large become fused_gemm (recycled output buffers)


def _fusible(n: Node) -> bool:
    if n.op in LEAVES or n.size == 0:
        return False
    return op_supported(n.op, n.attrs, [i.dtype for i in n.inputs], n.dtype)


def _key(n: Node):
    return (n.ann.get("phase"), n.ann.get("primitive_target"))


class _Groups:
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


# ---------------------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------------------
def fuse(graph: Graph) -> Graph:
    nodes = list(graph.nodes)
    pos = {n.id: k for k, n in enumerate(nodes)}
    by_id = {n.id: n for n in nodes}
    users: dict[int, list[Node]] = defaultdict(list)
    for n in nodes:
        for i in n.inputs:
            users[i.id].append(n)
    out_ids = {n.id for n in graph.outputs.values()}

    # -- ordering constraints (all go forward in the original order) -------------------------------------
    after: dict[int, list[Node]] = defaultdict(list)      # a -> nodes that must come after a
    effects_on: dict[int, list[Node]] = defaultdict(list)
    for n in nodes:
        for d in n.deps:
            after[d.id].append(n)
        if n.op in LEAVES:
            continue
        if get_primitive(n.op).category == "effect":
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

    def succ(n: Node):
        return users.get(n.id, []) + after.get(n.id, [])

    # -- grouping ----------------------------------------------------------------------------------------------
    fus = [n for n in nodes if _fusible(n)]
    fus_ids = {n.id for n in fus}
    G = _Groups(fus, pos)

    def n_inputs(members):
        ids = {m.id for m in members}
        ext = set()
        for m in members:
            for i in m.inputs:
                if i.id not in ids and not scalar_const(i):
                    ext.add(i.id)
        return len(ext)

    def valid(members) -> bool:
        try:
            sg, _ = subgraph_of(members, members)
            analyze(sg)
            return True
        except NotFusible:
            return False

    def creates_cycle(a: int, b: int) -> bool:
        union = {m.id for m in G.members[a]} | {m.id for m in G.members[b]}
        limit = max(G.maxpos[a], G.maxpos[b])

        def key(x: Node) -> int:
            g = G.gid.get(x.id)
            return G.minpos[g] if g is not None else pos[x.id]
        stack = []
        for m in G.members[a] + G.members[b]:
            for s in succ(m):
                if s.id not in union and key(s) < limit:
                    stack.append(s)
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
                for s in succ(y):
                    if s.id in union:
                        return True
                    if s.id not in visited and key(s) < limit:
                        stack.append(s)
        return False

    for n in fus:
        for p in n.inputs:
            if p.id not in fus_ids:
                continue
            ga, gb = G.gid[p.id], G.gid[n.id]
            if ga == gb or _key(p) != _key(n):
                continue
            merged = sorted(G.members[ga] + G.members[gb], key=lambda m: pos[m.id])
            if len(merged) > MAX_MEMBERS or n_inputs(merged) > MAX_INPUTS:
                continue
            if not valid(merged):
                continue
            if creates_cycle(ga, gb):
                continue
            G.merge(ga, gb)

    # -- which groups become kernels -----------------------------------------------------------------------
    def worth(members) -> bool:
        compute = [m for m in members if m.op not in VIEW_OPS]
        if not compute:
            return False
        if len(compute) == 1 and compute[0].size < MIN_LONE_SIZE and compute[0].op not in REDUCE_OPS:
            return False
        return True

    groups = [ms for ms in G.members.values() if worth(ms)]
    in_group: dict[int, int] = {}
    for k, ms in enumerate(groups):
        for m in ms:
            in_group[m.id] = k

    # -- in-place outputs (assigns absorbed) ------------------------------------------------------------------
    absorbed: dict[int, list[tuple[Node, Node, Node]]] = defaultdict(list)   # group -> (assign, var, value)
    for n in nodes:
        if n.op != "assign":
            continue
        var, val = n.inputs
        k = in_group.get(val.id)
        if k is None or var.op != "param" or var.dtype != np.float32 or len(effects_on[var.id]) != 1:
            continue
        if _key(n) != _key(val) or var.shape != val.shape:
            continue
        absorbed[k].append((n, var, val))

    # -- outline ------------------------------------------------------------------------------------------------
    units: list[dict] = []          # {"nodes": [...], "members": [...], "deps_in": [...]}
    value_of: dict[int, Node] = {}  # old node id -> new node producing its value
    unit_of_member: dict[int, list[int]] = defaultdict(list)
    replaced: dict[int, Node] = {}  # absorbed assign id -> fused_assign node
    extra_unit_edges: list[tuple[int, int]] = []
    view_exports: list[Node] = []   # view members whose outside users read the plain view node

    def cone(root: Node, member_ids: set, stop: set) -> list[Node]:
        need, stack = set(), [root]
        while stack:
            x = stack.pop()
            if x.id in need or x.id not in member_ids:
                continue
            need.add(x.id)
            if x.id in stop and x is not root:
                continue
            stack.extend(x.inputs)
        return [by_id[i] for i in sorted(need, key=lambda i: pos[i])]

    for k, ms in enumerate(groups):
        mids = {m.id for m in ms}
        inplace = absorbed.get(k, [])
        assign_ids = {a.id for a, _, _ in inplace}
        vals = {v.id: (a, var) for a, var, v in inplace}
        ext = {}
        for m in ms:
            us = [u for u in users.get(m.id, []) if u.id not in mids and u.id not in assign_ids]
            if us or m.id in out_ids:
                ext[m.id] = us
        # in-place kernels: cones cut at other assigned values and at reductions
        plans = []
        need_from_main: list[Node] = []
        ok = True
        order = sorted(inplace, key=lambda t: pos[t[2].id])
        written: set[int] = set()
        for a, var, val in order:
            stop = (set(vals) - {val.id}) | {m.id for m in ms if m.op in REDUCE_OPS}
            members = cone(val, mids, stop)
            cut_ids = [m for m in members if m.id in stop and m is not val]
            body = [m for m in members if not (m.id in stop and m is not val)]
            # reads of variables already overwritten by an earlier in-place kernel
            ext_reads = {i.id for m in body for i in m.inputs if i.id not in mids}
            roots = set()
            for i in ext_reads:      # through views: reading reshape(v) reads v
                x = by_id.get(i)
                while x is not None and x.op in VIEWS_OF_VAR:
                    x = x.inputs[0]
                if x is not None:
                    roots.add(x.id)
            if (ext_reads | roots) & written:
                ok = False
                break
            if any(_aliases_var(by_id.get(i), var, mids) for i in ext_reads if i in by_id):
                ok = False
                break
            written.add(var.id)
            for c in cut_ids:
                if c.op in REDUCE_OPS and c not in need_from_main:
                    need_from_main.append(c)
            plans.append((a, var, val, body, cut_ids))
        if ok:
            for a, var, val, body, cut_ids in plans:
                try:
                    sg, _ = subgraph_of(body, [val], inplace_var=var, cut={c.id: c for c in cut_ids})
                    analyze(sg)
                except NotFusible:
                    ok = False
                    break
        if not ok:
            inplace, plans, need_from_main = [], [], []
            assign_ids = set()
            for m in ms:
                us = [u for u in users.get(m.id, []) if u.id not in mids]
                if us or m.id in out_ids:
                    ext[m.id] = us
        # main kernel outputs: members used outside (not only by absorbed assigns) + reductions for the K's
        main_outs = [m for m in ms if m.id in ext and (ext[m.id] or m.id in out_ids)]
        # a member that only re-views an input (a reshape of it) is not worth a copy: its outside users
        # keep the plain view node
        for m in list(main_outs):
            if m.op in VIEW_OPS and m.op != "broadcast_to" and m.inputs[0].id not in mids:
                main_outs.remove(m)
                view_exports.append(m)
        for r in need_from_main:
            if r not in main_outs:
                main_outs.append(r)
        main_outs.sort(key=lambda m: pos[m.id])
        main_unit = None
        if main_outs:
            members = []
            seen = set()
            for o in main_outs:
                for m in cone(o, mids, set()):
                    if m.id not in seen:
                        seen.add(m.id)
                        members.append(m)
            members.sort(key=lambda m: pos[m.id])
            sg, ins = subgraph_of(members, main_outs)
            unit = {"members": list(members), "inputs": list(ins)}
            fnode = Node("fused", list(ins), {"_subgraph": sg}, (0,), np.uint8, scope=_scope(members),
                         ann={**_group_ann(members)})
            shape, dtype = get_primitive("fused").infer([i.shape for i in ins], [i.dtype for i in ins], fnode.attrs)
            fnode.shape, fnode.dtype = tuple(shape), np.dtype(dtype)
            fnode.name = _name(members, fnode.id)
            fnode.ann["fused_ops"] = [m.op for m in members]
            if len(main_outs) == 1:
                unit["nodes"] = [fnode]
                value_of[main_outs[0].id] = fnode
            else:
                gets = []
                for j, o in enumerate(main_outs):
                    g = Node("fused_get", [fnode], {"index": j, "shape": o.shape, "dtype": o.dtype.name}, o.shape,
                             o.dtype, scope=o.scope, ann={k2: v for k2, v in fnode.ann.items() if k2 != "fused_ops"})
                    g.name = f"{fnode.name}_out{j}"
                    gets.append(g)
                    value_of[o.id] = g
                unit["nodes"] = [fnode] + gets
            main_unit = len(units)
            units.append(unit)
            for m in members:
                unit_of_member[m.id].append(main_unit)
        for a, var, val, body, cut_ids in plans:
            cut = {c.id: c for c in cut_ids}
            sg, ins = subgraph_of(body, [val], inplace_var=var, cut=cut)
            node = Node("fused_assign", list(ins), {"_subgraph": sg}, var.shape, var.dtype, scope=_scope(body),
                        ann={**_group_ann(body)})
            node.name = _name(body, node.id)
            node.ann["fused_ops"] = [m.op for m in body] + ["assign"]
            u = len(units)
            units.append({"nodes": [node], "members": body + [a], "inputs": ins, "assign": a})
            replaced[a.id] = node
            value_of[a.id] = node
            value_of.setdefault(val.id, node)     # users of the value outside read the updated variable
            for m in body:
                unit_of_member[m.id].append(u)
            unit_of_member[a.id].append(u)
            if main_unit is not None:
                extra_unit_edges.append((main_unit, u))

    # unfused nodes are their own units; the other large GEMMs write into recycled buffers too
    exported = {m.id for m in view_exports}
    for n in nodes:
        if (n.id in in_group and n.id not in exported) or n.id in replaced:
            continue
        node = n
        if n.op in GEMM_OPS and n.dtype == np.float32 and n.nbytes >= GEMM_POOL_BYTES:
            node = Node("fused_gemm", list(n.inputs), {"op": n.op, "transpose_a": bool(n.attrs["transpose_a"]),
                                                       "transpose_b": bool(n.attrs["transpose_b"])},
                        n.shape, n.dtype, scope=n.scope, deps=list(n.deps), ann=dict(n.ann))
            node.name = n.name
            value_of[n.id] = node
        u = len(units)
        units.append({"nodes": [node], "members": [n], "inputs": None})
        unit_of_member[n.id].append(u)
        value_of.setdefault(n.id, n)

    # rewire inputs of unfused nodes and of new nodes to the new producers
    def producer(x: Node) -> Node:
        return value_of.get(x.id, x)

    for u in units:
        for node in u["nodes"]:
            if node.op == "fused_get":
                continue
            node.inputs = [producer(i) for i in node.inputs]
        # deps of members (none before order_effects) move to the unit's first node
        mset = {m.id for m in u["members"]}
        head = u["nodes"][0]
        head.deps = _dedupe([producer(d) for m in u["members"] for d in m.deps if d.id not in mset])

    units, unit_of_member, extra_unit_edges = _gemm_prologues(units, unit_of_member, extra_unit_edges, out_ids,
                                                              {producer(n).id for n in graph.outputs.values()})

    # -- schedule: Kahn over units, earliest original position first ---------------------------------------------
    node_unit: dict[int, int] = {}
    for k, u in enumerate(units):
        for node in u["nodes"]:
            node_unit[node.id] = k
    preds: list[set] = [set() for _ in units]
    for k, u in enumerate(units):
        for node in u["nodes"]:
            for i in list(node.inputs) + list(node.deps):
                j = node_unit.get(i.id)
                if j is not None and j != k:
                    preds[k].add(j)
    for n in nodes:
        for s in after.get(n.id, []):
            for a in unit_of_member.get(n.id, []):
                for b in unit_of_member.get(s.id, []):
                    if a != b:
                        preds[b].add(a)
    for a, b in extra_unit_edges:
        preds[b].add(a)
    prio = [min(pos[m.id] for m in u["members"]) for u in units]
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
        order.extend(units[k]["nodes"])
        for s in succs[k]:
            indeg[s] -= 1
            if indeg[s] == 0:
                heapq.heappush(heap, (prio[s], s))
    if done != len(units):
        raise IRError("graph-kernel fusion produced a cyclic schedule")

    out = Graph(graph.name)
    out.nodes = order
    out.outputs = {name: producer(n) for name, n in graph.outputs.items()}
    out.effects = [replaced.get(e.id, e) for e in graph.effects]
    out.meta = dict(graph.meta)
    return out


def _gemm_prologues(units, unit_of_member, extra_unit_edges, out_ids, new_out_ids):
    """Run a GEMM as the prologue of the ``fused`` kernel that is its only reader in the fused graph.

    Decided on the outlined graph, where every reader of the GEMM's value is known: the main kernel,
    the group's in-place kernels (``fused_assign``), views of it exported to outside consumers and
    unfused nodes. A prologue GEMM has no node of its own, so one more reader of any kind would read a
    value that is not in the graph. Returns the units with each absorbed GEMM merged into its kernel's
    unit (its members, and so its ordering constraints, move along), the member -> units map and the
    extra edges renumbered.
    """
    readers: dict[int, list[Node]] = defaultdict(list)
    unit_of_node: dict[int, int] = {}
    for k, u in enumerate(units):
        for node in u["nodes"]:
            unit_of_node[node.id] = k
            for i in _dedupe(list(node.inputs) + list(node.deps)):
                readers[i.id].append(node)
    into: dict[int, int] = {}            # absorbed GEMM unit -> kernel unit
    for k, u in enumerate(units):
        fnode = u["nodes"][0]
        if fnode.op != "fused":
            continue
        spec, new_inputs, gemms = [], [], []
        for x in fnode.inputs:
            j = unit_of_node.get(x.id)
            if _prologue_gemm(x, fnode, readers, new_out_ids) and j is not None and len(units[j]["nodes"]) == 1:
                op = x.attrs["op"] if x.op == "fused_gemm" else x.op
                spec.append((op, bool(x.attrs["transpose_a"]), bool(x.attrs["transpose_b"])))
                new_inputs.extend(x.inputs)
                fnode.deps = _dedupe(fnode.deps + list(x.deps))
                gemms.append(units[j]["members"][0])
                into[j] = k
            else:
                spec.append(None)
                new_inputs.append(x)
        if not gemms:
            continue
        fnode.inputs = new_inputs
        fnode.attrs["_prologue"] = tuple(spec)
        members = [m for m in u["members"] if m.op != "assign"]
        fnode.name = _name(gemms + members, fnode.id)
        fnode.ann["fused_ops"] = [g.op for g in gemms] + list(fnode.ann["fused_ops"])
        u["members"] = gemms + u["members"]
    if not into:
        return units, unit_of_member, extra_unit_edges
    renum, kept = {}, []
    for k, u in enumerate(units):
        if k not in into:
            renum[k] = len(kept)
            kept.append(u)
    for j, k in into.items():
        renum[j] = renum[k]
    new_map = defaultdict(list)
    for mid, us in unit_of_member.items():
        new_map[mid] = _dedupe_ints(renum[k] for k in us)
    edges = [(renum[a], renum[b]) for a, b in extra_unit_edges if renum[a] != renum[b]]
    return kept, new_map, edges


def _prologue_gemm(x: Node, fnode: Node, readers, out_ids) -> bool:
    """Can GEMM node ``x`` run inside ``fnode``: float32, same phase and target, read by nothing else?"""
    if x.op not in GEMM_OPS and x.op != "fused_gemm":
        return False
    return (x.dtype == np.float32 and x.id not in out_ids and _key(x) == _key(fnode)
            and [r.id for r in readers.get(x.id, [])] == [fnode.id])


def _dedupe_ints(xs):
    out = []
    for x in xs:
        if x not in out:
            out.append(x)
    return out


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
