"""featlab: which skip points of a CNN backbone carry which properties, and which help segmentation.

The public API is imported lazily so that ``import featlab`` and ``featlab --help`` stay fast:

    >>> import featlab
    >>> "resnet18" in featlab.list_backbones()
    True
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "get_backbone": "featlab.models",
    "list_backbones": "featlab.models",
    "BackboneSpec": "featlab.models",
    "skip_points": "featlab.points",
    "select_points": "featlab.points",
    "SkipPoint": "featlab.points",
    "capture": "featlab.capture",
    "Recorder": "featlab.capture",
    "module_calls": "featlab.hooked",
    "ModuleCall": "featlab.hooked",
    "load_dataset": "featlab.data",
    "list_datasets": "featlab.data",
    "extract": "featlab.cache.writer",
    "open_cache": "featlab.cache.reader",
    "merge_shards": "featlab.cache.merge",
    "keep_freed_memory": "featlab.allocator",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'featlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
