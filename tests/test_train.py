"""Model.train/eval, callbacks, checkpoints, seeds and the event hook."""
import numpy as np
import pytest

from conftest import batches
from runtime import Model, Tensor, context, hooks, nn
from runtime.dataset import NumpySlicesDataset
from runtime.models import MLP, LeNetDigits
from runtime.train import (Callback, CheckpointConfig, LossMonitor, ModelCheckpoint, TimeMonitor, load_checkpoint,
                           load_param_into_net, save_checkpoint)


def _mlp_model(seed=0, **kw):
    context.set_context(seed=seed)
    net = MLP((64, 32, 10))
    return net, Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                      nn.Momentum(net.trainable_params(), 0.05, 0.9), metrics=["accuracy", "loss"], **kw)


def _ds(digits, n=256, batch=32):
    xtr, ytr, _, _ = digits
    return NumpySlicesDataset((xtr[:n].reshape(-1, 64), ytr[:n]), ["x", "y"]).batch(batch)


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def begin(self, ctx): self.calls.append("begin")
    def epoch_begin(self, ctx): self.calls.append(f"epoch_begin{ctx.original_args()['cur_epoch_num']}")
    def step_end(self, ctx): self.calls.append(f"step{ctx.original_args()['cur_step_num']}")
    def epoch_end(self, ctx): self.calls.append("epoch_end")
    def end(self, ctx): self.calls.append("end")


def test_callbacks_run_in_order_and_loss_monitor_prints(digits, capsys):
    _, model = _mlp_model(progress=False)
    rec, lm = Recorder(), LossMonitor(per_print_times=4)
    model.train(2, _ds(digits, 128), callbacks=[rec, lm, TimeMonitor()])
    assert rec.calls == (["begin", "epoch_begin1"] + [f"step{i}" for i in range(1, 5)] + ["epoch_end", "epoch_begin2"]
                         + [f"step{i}" for i in range(5, 9)] + ["epoch_end", "end"])
    out = capsys.readouterr().out
    assert "epoch: 1 step: 4, loss is" in out and "epoch: 2 step: 4, loss is" in out
    assert "per step time" in out
    assert len(lm.losses) == 8 and lm.losses[-1] < lm.losses[0]


def test_progress_bar_is_shown(digits, capsys):
    _, model = _mlp_model(progress=True)
    model.train(1, _ds(digits, 64))
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "2/2" in err


def test_request_stop_ends_training(digits):
    class StopAt3(Callback):
        def step_end(self, ctx):
            if ctx.original_args()["cur_step_num"] == 3:
                ctx.request_stop()

    _, model = _mlp_model(progress=False)
    params = model.train(5, _ds(digits), callbacks=[StopAt3()])
    assert params["cur_step_num"] == 3 and model.step == 3


def test_nan_loss_stops_with_a_clear_message(digits):
    _, model = _mlp_model(progress=False)
    x, y = digits[0][:64].reshape(-1, 64).copy(), digits[1][:64]
    x[40, 3] = np.nan  # a corrupt sample in the second batch
    ds = NumpySlicesDataset((x, y), ["x", "y"]).batch(32)
    with pytest.raises(ValueError, match=r"epoch 1 step 2: loss is nan; training stopped"):
        model.train(3, ds, callbacks=[LossMonitor(100)])
    assert model.step == 2


def test_checkpoint_roundtrip(tmp_path, digits):
    net, model = _mlp_model(progress=False)
    ckpt = ModelCheckpoint(prefix="mlp", directory=str(tmp_path), config=CheckpointConfig(4, keep_checkpoint_max=2))
    model.train(2, _ds(digits, 128), callbacks=[ckpt])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["mlp-1_4.ckpt", "mlp-2_4.ckpt"]  # the oldest beyond keep_checkpoint_max was removed
    x = digits[2][:20].reshape(-1, 64)
    before = model.predict(x)
    net2, model2 = _mlp_model(seed=99, progress=False)
    assert not np.allclose(model2.predict(x), before)
    params = load_checkpoint(str(tmp_path / "mlp-2_4.ckpt"))
    assert set(params) == {p.name for p in net2.get_parameters()}
    load_param_into_net(net2, params)
    np.testing.assert_allclose(model2.predict(x), before, rtol=1e-6)


def test_checkpoint_errors(tmp_path):
    net = MLP((4, 2))
    path = save_checkpoint(net, str(tmp_path / "a"))
    assert path.endswith("a.ckpt")
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_checkpoint(str(tmp_path / "missing.ckpt"))
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(str(tmp_path / "bad.ckpt"))
    other = MLP((4, 3))
    with pytest.raises(ValueError, match="cannot load a value of shape"):
        load_param_into_net(other, load_checkpoint(path))


def test_same_seed_same_training(digits):
    data = batches(digits[0].reshape(-1, 64), digits[1], 32)[:5]
    runs = []
    for _ in range(2):
        context.set_context(seed=11)
        net = MLP((64, 32, 10), dropout=0.3)
        model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                      nn.SGD(net.trainable_params(), 0.1), progress=False)
        runs.append([model.train_step(x, y) for x, y in data])
    assert runs[0] == runs[1]
    context.set_context(seed=12)
    net = MLP((64, 32, 10), dropout=0.3)
    assert not np.allclose(net.get_parameters()[0].data, MLP((64, 32, 10)).get_parameters()[0].data)


def test_dropout_only_in_training():
    context.set_context(mode=context.PYNATIVE_MODE, seed=0)
    d = nn.Dropout(keep_prob=0.5)
    x = Tensor(np.ones((200, 50), np.float32))
    y = d.set_train(True)(x).asnumpy()
    assert set(np.unique(y)) == {0.0, 2.0} and 0.4 < (y == 0).mean() < 0.6
    np.testing.assert_array_equal(d.set_train(False)(x).asnumpy(), x.asnumpy())


def test_batchnorm_tracks_moving_statistics_and_uses_them_in_eval(rng):
    context.set_context(mode=context.PYNATIVE_MODE)
    bn = nn.BatchNorm2d(3, momentum=0.9)
    x = rng.normal(2.0, 3.0, size=(16, 3, 4, 4)).astype(np.float32)
    bn.set_train(True)(Tensor(x))
    np.testing.assert_allclose(bn.moving_mean.data, 0.1 * x.mean(axis=(0, 2, 3)), rtol=1e-5)
    n = x.size // 3
    np.testing.assert_allclose(bn.moving_variance.data, 0.9 + 0.1 * x.var(axis=(0, 2, 3)) * n / (n - 1), rtol=1e-5)
    y = bn.set_train(False)(Tensor(x)).asnumpy()
    expect = (x - bn.moving_mean.data[None, :, None, None]) / np.sqrt(bn.moving_variance.data[None, :, None, None] + 1e-5)
    np.testing.assert_allclose(y, expect, rtol=1e-5, atol=1e-5)


def test_eval_metrics(digits):
    _, model = _mlp_model(progress=False)
    model.train(3, _ds(digits, 512))
    res = model.eval(_ds(digits, 256))
    assert set(res) == {"accuracy", "loss"}
    assert 0.5 < res["accuracy"] <= 1.0 and 0 < res["loss"] < 2.3


def test_hook_sees_every_op_only_while_subscribed(digits):
    net = LeNetDigits(channels=(4, 8), hidden=16)
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                  nn.SGD(net.trainable_params(), 0.1), progress=False)
    x, y = digits[0][:8], digits[1][:8]
    model.train_step(x, y)
    exe = list(model._train_graphs.values())[0]
    events = []
    listener = hooks.subscribe(lambda kind, ev: events.append((kind, ev)))
    try:
        model.train(1, [(x, y), (x, y)])
    finally:
        hooks.unsubscribe(listener)
    tables = [e for k, e in events if k == "task_table"]
    assert len(tables) == 1  # static task metadata once per graph and listener
    cols = tables[0]["columns"]
    per_step = [e for k, e in events if k == "step_tasks"]
    assert [e["step"] for e in per_step] == [1, 2]
    for e in per_step:  # every task of the graph ran once, with a measured interval
        assert sorted(e["task_id"].tolist()) == cols["task_id"]
        assert (e["end_ns"] >= e["start_ns"]).all()
    assert sum(k == "kernel" for k in cols["kind"]) == len(exe.steps)
    conv = cols["op"].index("conv2d")
    assert cols["flops"][conv] == 2 * 8 * 4 * 8 * 8 * 9 and cols["scope"][conv].endswith("conv1")
    assert cols["stream"][conv] == "aicore0" and cols["phase"][conv] == "forward"
    steps = [e for k, e in events if k == "step"]
    assert [e["phase"] for e in steps] == ["begin", "end", "begin", "end"]
    for end in steps[1::2]:  # markers in order: data in, forward starts, backward ends, step ends
        assert end["get_next_start_ns"] <= end["get_next_end_ns"] <= end["fp_start_ns"] < end["bp_end_ns"] <= end["end_ns"]
        assert end["fp_start_op"].startswith("conv2d") and end["bp_end_op"]
    events.clear()
    model.train_step(x, y)
    assert events == [] and not hooks.listening
