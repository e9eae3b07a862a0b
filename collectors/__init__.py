"""Collectors: hook subscribers that turn runtime events into the Parquet tables of a run.

One module per concern -- ``steps``, ``tasks`` (the timeline), ``memory``, ``minddata``, ``graphs``,
``host_ops`` -- plus ``buffers`` (hot-path columnar buffers), ``schema`` (the exact Arrow schemas of
docs/trace-format.md) and ``writer`` (part files, manifest, background merging). ``insight.Profiler`` wires
them together; collectors never import ``insight``.
"""
from collectors.graphs import GraphRegistry, GraphsCollector
from collectors.host_ops import HostOpsCollector
from collectors.memory import MemoryCollector
from collectors.minddata import MindDataCollector
from collectors.schema import SCHEMA_VERSION, SCHEMAS
from collectors.steps import StepsCollector
from collectors.tasks import TasksCollector
from collectors.writer import RunWriter

__all__ = ["GraphRegistry", "GraphsCollector", "HostOpsCollector", "MemoryCollector", "MindDataCollector",
           "StepsCollector", "TasksCollector", "RunWriter", "SCHEMAS", "SCHEMA_VERSION"]
