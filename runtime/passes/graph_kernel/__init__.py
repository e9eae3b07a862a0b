"""Graph-kernel fusion (``context.set_context(enable_graph_kernel=True)``).

``graph_kernel(graph) -> graph`` runs over the whole training step (forward + backward + optimizer
update are one graph). It expects a verified, DCE'd graph without ordering deps (it runs after
``dce`` and before ``order_effects``) and returns a graph that passes ``graph.verify()``.

Copy or in place: ``graph_kernel`` copies the graph (``clone``: fresh nodes, leaves keep their bound
variables) and runs the passes on the copy, so the graph it is given is not modified. The four passes
themselves rewrite the nodes they are given in place (``expand``, ``simplify`` and ``fuse`` rewire the
inputs of the nodes they keep and return a new Graph object over them; ``build_kernels`` annotates the
fused nodes with their programs); each module says so. Kernel generation itself is ``runtime.codegen``.
Four Graph -> Graph passes, one module each, after one pattern rewrite:

0. ``fuse_attention`` (``attention.py``) -- scaled-dot-product attention (q kᵀ, scale, key mask, softmax,
   dropout, p v) and its autodiff backward, matched exactly, become one ``fused_attention_fwd`` and one
   ``fused_attention_grad`` node (tiled flash-style kernels, ``runtime.ops.attention``); anything that
   differs stays as it is for the passes below.
1. ``expand``   -- composites into primitives, forward and backward: gelu / gelu_grad, layer_norm and
   its two gradients, softmax / log_softmax and their gradients, softmax_cross_entropy (+grad),
   reduce_mean, relu_grad. The formulas follow the Cython kernels they replace op for op, and the
   generated ``exp`` is the same Cephes float32 algorithm (with FMAs, so within an ulp): losses
   agree to ~1e-6.
2. ``simplify`` -- constant folding, algebraic identities (x*1, x+0, x-0, x/1, neg(neg x), reshape
   chains, identity casts / broadcasts / transposes, slice of concat, ...), phase-local CSE, DCE.
3. ``fuse``     -- groups elementwise / broadcast / reshape-like / reduce nodes producer-to-consumer
   without creating cycles (data edges *and* the ordering constraints of in-place updates and of
   random sources are checked), never through opaque ops (matmul, conv, gather, ...). A group is
   outlined as:
     * one ``fused`` node when it has one output; with several outputs, one ``fused`` node that
       returns a tuple plus one ``fused_get`` node per output (the IR stays single-output; one
       kernel launch per group, the gets cost nothing);
     * one ``fused_assign`` effect node per ``assign`` whose value the group computes: the value is
       written in place into the variable (no temporary, no copy), exactly where the ``assign``
       was in the order relative to the variable's readers;
     * a ``matmul`` / ``batch_matmul`` whose only reader is the group's kernel runs as the kernel's
       prologue (library GEMM into a recycled buffer, the group as its epilogue: bias add + gelu,
       scale + softmax, the dropout / layer-norm backward after ``dX = dY W``) -- one task; the
       other large GEMMs become ``fused_gemm`` nodes (the same library call into recycled buffers).
   Nodes are named like ``Fused_Mul_Add_Tanh_12``; ``ann["fused_ops"]`` lists the member op types
   (the profiler shows it per task) and ``ann["fused_from"]`` the expanded composites.
4. ``build_kernels`` -- one kernel per fused node, built by ``runtime.codegen`` (``schedule.analyze`` ->
   ``c_source.generate`` -> ``kernel_cache``, or the ``interpreter``):
     * the group is mapped onto one iteration domain (common refinement of its shapes, collapsed);
       broadcast inputs (bias, per-channel statistics, scalars) are read by index arithmetic
       (stride 0), never materialised; views are free;
     * ONE pass over memory in cache-sized chunks of the outermost axis, OpenMP over the chunks,
       no full-size temporaries: every value is an inline scalar expression in a loop that
       auto-vectorises. Reductions over the last axis (softmax, layer norm) or over leading axes
       (bias / gamma gradients, batch-norm statistics) fuse with their elementwise producers and,
       when the group consumes them, with their consumers (phases that recompute within the chunk);
     * values needed again in a later phase are kept in a per-thread chunk buffer instead of being
       recomputed when that is cheaper; large flat outputs are written with non-temporal stores;
       kernel outputs of a megabyte or more come from a small caching allocator (``codegen.buffers``)
       so they do not pay a page fault per 4 KB on every step;
     * C compiled by gcc ``-O3 -fopenmp -march=native -shared -fPIC -ffp-contract=off
       -fno-math-errno``, cached in ``$XDG_CACHE_HOME/insight/kernels`` (``~/.cache/...``) under a
       hash of source + header + flags + compiler + CPU (temp file + rename: safe across processes),
       loaded with ctypes. The missing kernels of a graph are compiled in two batches by two gcc
       processes. Kernels are generic in the sizes: identical groups share one compiled function;
     * fallback: with no working compiler the same plan runs on the Cython tile interpreter
       (``runtime/_fusion.pyx``), bit-identical to the compiled kernels (same element functions in
       ``codegen/element_ops.h``, same loop and accumulation order, no FMA contraction); see
       ``runtime.codegen.set_backend``.

``graph_kernel(graph, dump_dir=...)`` writes ``<name>.before.txt`` / ``<name>.after.txt`` (the stable
``Graph.dump`` text); ``dumps(graph)`` returns both texts and the fused graph.
"""
from __future__ import annotations

import os

from runtime.ir.graph import Graph, Node
from runtime.passes.dce import dce
from runtime.passes.graph_kernel.attention import fuse_attention
from runtime.passes.graph_kernel.build_kernels import build_kernels
from runtime.passes.graph_kernel.expand import expand
from runtime.passes.graph_kernel.fuse import fuse
from runtime.passes.graph_kernel.simplify import simplify

__all__ = ["graph_kernel", "dumps", "fuse_attention", "expand", "simplify", "fuse", "build_kernels", "clone"]


def clone(graph: Graph) -> Graph:
    """A copy of ``graph`` with fresh nodes (leaves keep their attrs, e.g. the bound variable)."""
    new: dict[int, Node] = {}
    out = Graph(graph.name)
    for n in graph.nodes:
        m = Node(n.op, [new[i.id] for i in n.inputs], dict(n.attrs), n.shape, n.dtype, scope=n.scope,
                 deps=[new[d.id] for d in n.deps], ann=dict(n.ann))
        m.name = n.name
        new[n.id] = m
        out.nodes.append(m)
    out.outputs = {k: new[v.id] for k, v in graph.outputs.items()}
    out.effects = [new[e.id] for e in graph.effects]
    out.meta = dict(graph.meta)
    return out


def graph_kernel(graph: Graph, dump_dir: str | os.PathLike | None = None) -> Graph:
    """Expand, simplify, fuse and generate kernels; returns a new, verified graph."""
    before = graph.dump() if dump_dir is not None else None
    g = clone(graph)
    g = fuse_attention(g)
    g = expand(g)
    g = simplify(g)
    g = fuse(g)
    g = build_kernels(g)
    g = dce(g)           # scalar constants now inlined into kernels
    g.verify()
    g.meta["graph_kernel"] = True
    if dump_dir is not None:
        os.makedirs(dump_dir, exist_ok=True)
        with open(os.path.join(dump_dir, f"{graph.name}.before.txt"), "w") as f:
            f.write(before + "\n")
        with open(os.path.join(dump_dir, f"{graph.name}.after.txt"), "w") as f:
            f.write(g.dump() + "\n")
    return g


def dumps(graph: Graph) -> tuple[str, str, Graph]:
    """(dump before fusion, dump after fusion, fused graph)."""
    before = graph.dump()
    g = graph_kernel(graph)
    return before, g.dump(), g
