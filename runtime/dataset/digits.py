"""The scikit-learn 8x8 digits data (shipped inside scikit-learn, no download), split 80/20 with a seed."""
from __future__ import annotations

import numpy as np


def load_digits_split(seed: int = 0, test_fraction: float = 0.2, flatten: bool = False):
    """Returns (x_train, y_train, x_test, y_test): images scaled to [0, 1] as float32 (N, 1, 8, 8)
    (or (N, 64) with ``flatten``), labels int32."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    x = x.reshape(len(x), 64) if flatten else x[:, None, :, :]
    y = d.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    te, tr = order[:n_test], order[n_test:]
    return x[tr], y[tr], x[te], y[te]
