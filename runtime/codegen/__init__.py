"""Code generation for fused groups: from a ``SubGraph`` (a group of primitive ops cut out of a graph) to a
kernel that runs -- compiled C, or the same schedule on the Cython tile interpreter.

Used by the graph-kernel fusion passes (``runtime/passes/graph_kernel``: ``fuse`` builds SubGraphs,
``build_kernels`` attaches programs) and by the fused primitives (``runtime/ops/fused.py``), which run them.
It never imports the passes or the primitives.

* ``subgraph``     -- the mini IR (``SOp``, ``SubGraph``), the kernel language's op table, the fuser's
                      whitelist (``op_supported``) and ``subgraph_of`` (IR nodes -> SubGraph);
* ``schedule``     -- ``analyze(SubGraph) -> Plan``: one iteration domain, broadcast patterns, reductions
                      and phases, cache-sized chunks, the fixed accumulation order;
* ``c_source``     -- ``generate(Plan) -> (name, C source)``: one function per structure, generic in sizes;
* ``kernel_cache`` -- gcc, the on-disk cache (``~/.cache/insight/kernels``), loading with ctypes;
* ``interpreter``  -- the bridge to ``runtime/_fusion.pyx``: ``encode(Plan)`` for its bit-identical tile
                      interpreter, and the GIL-free caller of compiled kernels;
* ``program``      -- ``program_for(SubGraph) -> Program`` (callable), shared by identical groups; the
                      backend switch (auto / c / interp / numpy);
* ``buffers``      -- recycled aligned memory for large outputs;
* ``element_ops.h`` -- the element functions (Cephes float32 exp, log, tanh, ...) shared by the generated
                      C and the interpreter.
"""
from runtime.codegen.buffers import BufferPool, aligned_empty
from runtime.codegen.kernel_cache import cache_dir, compiler, compiler_available
from runtime.codegen.program import (Program, backend, get_backend, prepare, program_for, set_backend, set_threads,
                                     threads)
from runtime.codegen.schedule import Plan, analyze
from runtime.codegen.subgraph import OPCODES, NotFusible, SOp, SubGraph, op_supported, subgraph_of

__all__ = ["BufferPool", "aligned_empty", "cache_dir", "compiler", "compiler_available", "Program", "backend",
           "get_backend", "prepare", "program_for", "set_backend", "set_threads", "threads", "Plan", "analyze",
           "OPCODES", "NotFusible", "SOp", "SubGraph", "op_supported", "subgraph_of"]
