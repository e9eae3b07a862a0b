from runtime.ir.graph import Graph, IRError, Node, toposort  # noqa: F401
