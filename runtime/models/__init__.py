"""Small reference networks used by the demo, the tests and the benchmarks."""
from __future__ import annotations

from runtime import nn


class LeNetDigits(nn.Cell):
    """LeNet-style CNN for 8x8 digits: (conv-BN-ReLU-pool) x 2, then two Dense layers."""

    def __init__(self, num_classes: int = 10, channels=(16, 32), hidden: int = 64):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, pad_mode="same")
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, pad_mode="same")
        self.bn2 = nn.BatchNorm2d(c2)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2, 2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Dense(c2 * 2 * 2, hidden)
        self.fc2 = nn.Dense(hidden, num_classes)

    def construct(self, x):
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


class MLP(nn.Cell):
    def __init__(self, sizes=(64, 256, 256, 10), dropout: float = 0.0):
        super().__init__()
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Dense(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
                if dropout:
                    layers.append(nn.Dropout(keep_prob=1.0 - dropout))
        self.layers = nn.SequentialCell(layers)

    def construct(self, x):
        return self.layers(x)


from runtime.models.wide_deep import WideDeep, WideDeepConfig  # noqa: E402,F401  (Criteo Wide&Deep)
