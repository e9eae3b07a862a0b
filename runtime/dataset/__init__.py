"""Datasets (MindData-shaped API) on a threaded pipeline engine.

    ds = NumpySlicesDataset((x, y), ["image", "label"], shuffle=True, seed=7)
    ds = ds.map(augment, input_columns="image", num_parallel_workers=2).batch(32, drop_remainder=True)
    for image, label in ds: ...

Every op runs in its own worker thread(s), connected by bounded queues (``config.set_prefetch_size``,
default 16). Output order is deterministic and independent of ``num_parallel_workers``.

Seeding: a shuffle draws, for pass ``p`` of the ``k``-th iterator created from a dataset object,
from ``np.random.default_rng([seed, k, p])`` where ``seed`` is the op's own seed, else one derived
from ``config.get_seed()`` (which follows ``runtime.random``'s global seed unless set) and the op's
type and distance from the source. So repeated ``for`` loops over one dataset (epochs) reshuffle,
yet the whole sequence is reproducible.

Modules: ``ops`` (the dataset ops), ``engine`` (stages, connectors, iterator, statistics and the
``dataset_pipeline`` / ``dataset_op`` / ``queue_sample`` events), ``config``.
"""
from runtime.dataset.config import config
from runtime.dataset.engine import DatasetError, DatasetIterator
from runtime.dataset.ops import (BatchDataset, Dataset, GeneratorDataset, MapDataset, NumpySlicesDataset,
                                 RepeatDataset, ShuffleDataset)

__all__ = ["config", "Dataset", "DatasetError", "DatasetIterator", "NumpySlicesDataset", "GeneratorDataset",
           "MapDataset", "BatchDataset", "ShuffleDataset", "RepeatDataset"]
