import numpy as np
import pytest

from runtime import context


@pytest.fixture(autouse=True)
def _fresh_context():
    """Every test starts in GRAPH_MODE with seed 0 and leaves the global context as it found it."""
    context.reset_context()
    yield
    context.reset_context()


@pytest.fixture(scope="session")
def digits():
    from runtime.dataset.digits import load_digits_split
    return load_digits_split(seed=0)


def batches(x, y, batch_size, drop_remainder=True):
    """A plain list of (data, label) batches in order: deterministic input for comparisons."""
    n = len(x) // batch_size * batch_size if drop_remainder else len(x)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
