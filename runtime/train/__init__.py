"""Training: Model, callbacks, metrics and checkpoints."""
from runtime.train.callback import (Callback, CheckpointConfig, LossMonitor, ModelCheckpoint, RunContext,
                                    TimeMonitor)
from runtime.train.metrics import Accuracy, Loss, Metric
from runtime.train.model import Model
from runtime.train.serialization import load_checkpoint, load_param_into_net, save_checkpoint

__all__ = ["Callback", "CheckpointConfig", "LossMonitor", "ModelCheckpoint", "RunContext", "TimeMonitor",
           "Accuracy", "Loss", "Metric", "Model", "load_checkpoint", "load_param_into_net", "save_checkpoint"]
