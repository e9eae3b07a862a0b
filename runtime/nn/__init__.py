"""Neural-network Cells, losses and optimizers (MindSpore's ``nn`` namespace)."""
from runtime.nn.cell import Cell
from runtime.nn.init import initializer
from runtime.nn.layers import (ELU, GELU, AvgPool2d, BatchNorm1d, BatchNorm2d, Conv2d, Dense, Dropout,
                               Embedding, Flatten, LayerNorm, LeakyReLU, MaxPool2d, ReLU, SequentialCell,
                               Sigmoid, Softmax, Tanh)
from runtime.nn.loss import MSELoss, SoftmaxCrossEntropyWithLogits
from runtime.nn.optim import (FTRL, SGD, Adam, AdamW, AdamWeightDecay, LazyAdam, Momentum, Optimizer,
                              SparseGrad)
from runtime.nn.embedding import EmbeddingLookup  # noqa: F401  (host/device embedding tables, sparse path)
from runtime.nn.parameter import Parameter
from runtime.nn.gnn import FeatureDropout, GATConv, GCNConv, GraphStructure, SparseFeatures  # noqa: F401  (GNN)
from runtime.nn.quant import (ActQuant, Conv2dBnAct, Conv2dBnFoldQuant, Conv2dQuant, DenseBnAct,  # noqa: F401
                               DenseQuant, FakeQuantWithMinMax, ReLUQuant, TensorAdd, TensorAddQuant)

__all__ = [
    "Cell", "initializer", "Parameter", "ELU", "GELU", "AvgPool2d", "BatchNorm1d", "BatchNorm2d", "Conv2d",
    "Dense", "Dropout", "Embedding", "Flatten", "LayerNorm", "LeakyReLU", "MaxPool2d", "ReLU", "SequentialCell",
    "Sigmoid", "Softmax", "Tanh", "MSELoss", "SoftmaxCrossEntropyWithLogits", "FTRL", "SGD", "Adam", "AdamW",
    "AdamWeightDecay", "LazyAdam", "Momentum", "Optimizer", "SparseGrad",
]
