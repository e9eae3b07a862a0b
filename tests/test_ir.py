"""The IR: text dump, verifier, topological order, one graph per training step."""
import numpy as np
import pytest

from runtime import Model, nn
from runtime.core import GraphBuilder, building
from runtime.ir.graph import Graph, IRError, Node, toposort
from runtime.ops import api as F


def _small_graph():
    g = Graph("g")
    b = GraphBuilder(g)
    with building(b):
        x = b.input("x", (4, 3), np.float32)
        y = F.relu(F.add(x, 1.0))
        g.outputs["y"] = F.reduce_sum(y, 1).node
    return g


def test_dump_is_stable_and_readable():
    a, b = _small_graph().dump(), _small_graph().dump()
    assert a == b  # node ids are renumbered, so two traces of the same code diff clean
    assert "%0 = input() {name='x'} : float32[4x3]" in a
    assert "%3 = relu(%2) : float32[4x3]" in a and "output y = %4" in a


def test_verify_accepts_a_traced_graph():
    _small_graph().verify()


def test_verify_catches_dangling_input():
    g = _small_graph()
    stray = Node("input", [], {"name": "stray"}, (4, 3), np.float32)
    g.nodes[2].inputs[0] = stray
    with pytest.raises(IRError, match="dangling input"):
        g.verify()


def test_verify_catches_shape_mismatch():
    g = _small_graph()
    relu = next(n for n in g.nodes if n.op == "relu")
    relu.shape = (4, 4)
    with pytest.raises(IRError, match=r"relu.*recorded as \(4, 4\).*inputs give \(4, 3\)"):
        g.verify()


def test_verify_catches_dtype_mismatch():
    g = _small_graph()
    relu = next(n for n in g.nodes if n.op == "relu")
    relu.dtype = np.dtype(np.float64)
    with pytest.raises(IRError, match="float64"):
        g.verify()


def test_verify_and_toposort_catch_cycles():
    g = _small_graph()
    add = next(n for n in g.nodes if n.op == "add")
    relu = next(n for n in g.nodes if n.op == "relu")
    add.inputs[0] = relu  # relu -> add -> relu
    with pytest.raises(IRError, match="cycle"):
        g.verify()
    with pytest.raises(IRError, match="cycle"):
        toposort(g.nodes, g.roots())


def test_training_step_is_one_graph(digits):
    xtr, ytr, _, _ = digits
    net = nn.SequentialCell(nn.Dense(64, 16), nn.ReLU(), nn.Dense(16, 10))
    opt = nn.Adam(net.trainable_params(), 1e-3)
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"), opt, progress=False)
    x = xtr[:8].reshape(8, 64)
    exe = model.train_graph(x, ytr[:8])
    ops = exe.graph.op_counts()
    # forward, backward and update in one graph
    assert ops["matmul"] == 2 + 3  # 2 forward, 3 backward (dx of layer 1 is not needed)
    assert ops["softmax_cross_entropy"] == 1 and ops["softmax_cross_entropy_grad"] == 1
    assert ops["assign"] == 4 * 3 + 2  # param, moment1, moment2 per parameter + beta powers
    assert set(exe.graph.effects) <= set(exe.graph.nodes)
    exe.graph.verify()
    # every update of a parameter waits for every reader of that parameter
    for n in exe.graph.nodes:
        if n.op == "assign" and n.inputs[0].op == "param":
            var = n.inputs[0]
            readers = [u for u in exe.graph.nodes if var in u.inputs and u is not n]
            assert all(r in n.deps or r.op == "assign" for r in readers if exe.graph.nodes.index(r) <
                       exe.graph.nodes.index(n))


def test_dce_drops_unused_nodes():
    from runtime.passes.dce import dce

    g = _small_graph()
    b = GraphBuilder(g)
    with building(b):
        F.exp(b.input("unused", (2,), np.float32))
    assert "exp" in g.op_counts()
    assert "exp" not in dce(g).op_counts()
