"""Host/device placement demo: a model whose embedding table does not fit the device.

    python -m runtime.examples.host_placement

First the device (32 MB here) runs out of memory with a message naming the largest tensors; then the
table and its sparse optimizer are placed on the host (primitive_target="CPU") and training converges.
"""
import numpy as np

from runtime import Model, context, nn
from runtime.device import DeviceOutOfMemoryError

VOCAB, DIM, FIELDS = 150_000, 32, 4


class WideDeepish(nn.Cell):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, DIM)
        self.mlp = nn.SequentialCell(nn.Dense(FIELDS * DIM, 32), nn.ReLU(), nn.Dense(32, 2))

    def construct(self, ids):
        return self.mlp(self.embedding(ids).reshape(ids.shape[0], -1))


def make_model(on_host: bool):
    net = WideDeepish()
    if on_host:
        net.embedding.set_attr("primitive_target", "CPU")
    opt = nn.LazyAdam(net.trainable_params(), learning_rate=0.01)
    if on_host:
        opt.target = "CPU"
    return Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"), opt, progress=False)


def main():
    context.set_context(mode=context.GRAPH_MODE, seed=0, device_memory="32MB")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(512, FIELDS)).astype(np.int32)
    labels = ((ids % 7).sum(axis=1) % 2).astype(np.int32)
    try:
        make_model(on_host=False).train_step(ids[:64], labels[:64])
    except DeviceOutOfMemoryError as e:
        print("1) everything on the device:\n" + str(e) + "\n")
    model = make_model(on_host=True)
    print("2) embedding table and LazyAdam on the host:")
    for epoch in range(15):
        losses = [model.train_step(ids[i:i + 64], labels[i:i + 64]) for i in range(0, 512, 64)]
        if epoch % 3 == 0 or epoch == 14:
            print(f"   epoch {epoch + 1:2d}: loss {np.mean(losses):.4f}")
    exe = list(model._train_graphs.values())[0]
    mem = exe.memory_summary()
    print(f"   device: parameters {mem['parameters'] / 2**20:.2f} MB + activations {mem['planned_peak'] / 2**20:.2f} MB; "
          f"host parameters {mem['host_parameters'] / 2**20:.1f} MB")


if __name__ == "__main__":
    main()
