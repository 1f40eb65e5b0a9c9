"""Teacher caches: format, writer, reader, verification."""

from .catalog import cache_info, list_caches
from .layout import CacheStore, cache_root
from .reader import Batch, CachedSequence, CacheReader
from .verify import VerifyReport, verify_cache
from .writer import CacheConfig, CacheResult, build_cache

__all__ = [
    "Batch",
    "CacheConfig",
    "CacheReader",
    "CacheResult",
    "CacheStore",
    "CachedSequence",
    "VerifyReport",
    "build_cache",
    "cache_info",
    "cache_root",
    "list_caches",
    "verify_cache",
]
