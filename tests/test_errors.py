"""Bad input fails at graph build with one message naming the Cell and the shapes."""
import numpy as np
import pytest

from runtime import Model, ShapeError, Tensor, context, nn
from runtime.executor import FeedError
from runtime.models import LeNetDigits


def _model(net):
    return Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                 nn.SGD(net.trainable_params(), 0.1), progress=False)


@pytest.mark.parametrize("mode", [context.GRAPH_MODE, context.PYNATIVE_MODE], ids=["graph", "pynative"])
def test_dense_fed_wrong_width_names_cell_and_shapes(mode):
    context.set_context(mode=mode)
    net = nn.SequentialCell(nn.Dense(64, 10))
    with pytest.raises(ShapeError) as e:
        _model(net).train_step(np.zeros((32, 63), np.float32), np.zeros(32, np.int32))
    msg = str(e.value)
    assert "Dense(in_channels=64, out_channels=10)" in msg
    assert "(*, 64)" in msg and "(32, 63)" in msg
    assert "SequentialCell/0" in msg  # where in the network


def test_error_raised_while_tracing_not_inside_a_kernel():
    net = nn.SequentialCell(nn.Dense(64, 32), nn.ReLU(), nn.Dense(31, 10))
    with pytest.raises(ShapeError) as e:
        _model(net).train_step(np.zeros((4, 64), np.float32), np.zeros(4, np.int32))
    assert "Dense(in_channels=31, out_channels=10) at 'SequentialCell/2'" in str(e.value)
    assert "(4, 32)" in str(e.value)
    tb = e.traceback
    assert not any("_kernels" in str(entry.path) or "numpy" in str(entry.path) for entry in tb)


def test_conv_channel_mismatch():
    net = LeNetDigits()
    with pytest.raises(ShapeError, match=r"Conv2d\(in_channels=1, .*\(N, 1, H, W\) but got \(2, 3, 8, 8\)"):
        _model(net).train_step(np.zeros((2, 3, 8, 8), np.float32), np.zeros(2, np.int32))


def test_labels_of_wrong_shape_name_the_loss():
    net = nn.SequentialCell(nn.Dense(4, 3))
    with pytest.raises(ShapeError, match=r"SoftmaxCrossEntropyWithLogits.*\(5,\).*got \(5, 3\)"):
        _model(net).train_step(np.zeros((5, 4), np.float32), np.zeros((5, 3), np.int32))


def test_op_level_error_names_the_enclosing_cell():
    class Bad(nn.Cell):
        def construct(self, x):
            return x + Tensor(np.ones((3,), np.float32))

    with pytest.raises(ShapeError, match=r"Bad\(\) at 'Bad': add: shapes \(2, 4\) and \(3,\) cannot be broadcast"):
        Bad()(Tensor(np.ones((2, 4), np.float32)))


def test_dtype_mismatch_is_reported():
    with pytest.raises(ShapeError, match="dtypes differ"):
        Tensor(np.ones(3, np.float32)) + Tensor(np.ones(3, np.float64))


def test_feed_errors_name_the_input():
    from runtime.core import GraphBuilder, building
    from runtime.compiler import compile as compile_graph
    from runtime.ir.graph import Graph

    g = Graph("g")
    b = GraphBuilder(g)
    with building(b):
        x = b.input("x", (2, 2), np.float32)
        g.outputs["y"] = (x * 2.0).node
    exe = compile_graph(g)
    with pytest.raises(FeedError, match=r"input 'x' expects \(2, 2\) float32, got \(2, 3\) float32"):
        exe({"x": np.zeros((2, 3), np.float32)})
    with pytest.raises(FeedError, match="no value fed for input 'x'"):
        exe({})


def test_out_of_range_label_and_embedding_index():
    net = nn.SequentialCell(nn.Dense(4, 3))
    with pytest.raises(IndexError, match="7"):
        _model(net).train_step(np.zeros((2, 4), np.float32), np.array([0, 7], np.int32))
    emb = nn.Embedding(5, 2)
    with pytest.raises(IndexError, match="9"):
        context.set_context(mode=context.PYNATIVE_MODE)
        emb(Tensor(np.array([1, 9], np.int64)))


def test_bad_context_and_initializer_options():
    with pytest.raises(ValueError, match="unknown option 'modee'"):
        context.set_context(modee=1)
    with pytest.raises(ValueError, match="unknown init 'bogus'"):
        nn.Dense(2, 2, weight_init="bogus")


def test_symbolic_value_cannot_be_read_while_tracing():
    class Peek(nn.Cell):
        def construct(self, x):
            return float(x.asnumpy().sum())

    from runtime.core import GraphBuilder, building
    from runtime.ir.graph import Graph

    b = GraphBuilder(Graph("g"))
    with building(b), pytest.raises(RuntimeError, match="symbolic"):
        Peek()(b.input("x", (2,), np.float32))
