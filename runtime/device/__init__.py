"""The simulated Ascend device: memory pool, memory plan, task compiler and the data-sink queue."""
from runtime.device.memory import Device, DeviceOutOfMemoryError, MemoryPool, get_device, parse_size  # noqa: F401
