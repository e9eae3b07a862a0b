"""Parameter: a named, persistent Tensor whose storage optimizers update in place.

Defined in ``runtime.core`` beside Tensor (tracing maps Parameters to ``param`` leaves); this module
is its home in the ``nn`` namespace, as in MindSpore.
"""
from runtime.core import Parameter  # noqa: F401
