"""hpd-tools: cache a teacher's top-k log-probs once, distill students from the cache."""

from .cache import (
    Batch,
    CacheConfig,
    CachedSequence,
    CacheReader,
    CacheResult,
    build_cache,
    cache_info,
    cache_root,
    list_caches,
    verify_cache,
)
from .data import Fields
from .errors import CacheCorruptError, CacheError, DataError, HPDError

__version__ = "0.1.0"

# The trainer API (hpd_tools.api) imports torch: loaded on first use, so that
# `import hpd_tools` (and the CLI's start) stays free of it.
_API = ("CacheCollator", "CacheDataset", "MicroBatch", "distill_loss")


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'hpd_tools' has no attribute {name!r}")


__all__ = [
    "Batch",
    "CacheCollator",
    "CacheConfig",
    "CacheCorruptError",
    "CacheDataset",
    "CacheError",
    "CacheReader",
    "CacheResult",
    "CachedSequence",
    "DataError",
    "Fields",
    "HPDError",
    "MicroBatch",
    "build_cache",
    "cache_info",
    "cache_root",
    "distill_loss",
    "list_caches",
    "verify_cache",
]
