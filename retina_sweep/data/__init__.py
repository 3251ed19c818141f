"""Datasets (COCO format), transforms, loaders and the synthetic proxy.

Names are imported lazily (PEP 562) so that `retina_sweep.data.synthetic`, which the generator's
worker processes import, does not pull in torch and pycocotools.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CocoDetection": "coco",
    "CocoPaths": "coco",
    "DatasetError": "coco",
    "MissingDataError": "coco",
    "coco_paths": "coco",
    "load_coco": "coco",
    "collate": "loader",
    "build_loader": "loader",
    "EpochShuffleSampler": "loader",
    "generate": "synthetic",
    "SyntheticParams": "synthetic",
    "SyntheticSplits": "synthetic",
    "default_cache_dir": "synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
