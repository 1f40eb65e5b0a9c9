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

__all__ = [
    "Batch",
    "CacheConfig",
    "CacheCorruptError",
    "CacheError",
    "CacheReader",
    "CacheResult",
    "CachedSequence",
    "DataError",
    "Fields",
    "HPDError",
    "build_cache",
    "cache_info",
    "cache_root",
    "list_caches",
    "verify_cache",
]
