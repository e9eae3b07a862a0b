"""Training: Model, callbacks, metrics and checkpoints."""
from runtime.train.callback import (Callback, CheckpointConfig, LossMonitor, ModelCheckpoint, RunContext,
                                    TimeMonitor)
from runtime.train.metrics import Accuracy, Loss, Metric
from runtime.train.model import Model
from runtime.train.serialization import load_checkpoint, load_param_into_net, save_checkpoint
from runtime.train.quant import convert_quant_network, convert_to_int8, export_onnx, load_int8  # noqa: F401  (QAT)

__all__ = ["Callback", "CheckpointConfig", "LossMonitor", "ModelCheckpoint", "RunContext", "TimeMonitor",
           "Accuracy", "Loss", "Metric", "Model", "load_checkpoint", "load_param_into_net", "save_checkpoint"]
