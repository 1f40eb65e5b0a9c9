"""``info`` and ``list``: what a cache holds and which caches exist (local folders or URLs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import HPDError
from .layout import CacheStore, as_location, cache_home, caches_under


def cache_info(path: str | Path) -> dict[str, Any]:
    """The cache's attributes plus stats measured now (bytes on disk, units done)."""
    store = CacheStore(path)
    attrs = store.attrs
    counts = attrs["counts"]
    sizes = store.bytes_on_disk()
    total = sum(sizes.values())
    return {
        "location": str(store.location),
        "key": store.key,
        "complete": store.complete,
        "units_done": len(store.done_units()),
        "units_total": store.n_units,
        "sequences": counts["sequences"],
        "tokens": counts["tokens"],
        "response_tokens": counts["response_tokens"],
        "k": store.k,
        "signal": store.signal,
        # Sampled caches: draws per position, and the distinct ids they gave (the rows' mean length).
        "samples": attrs.get("samples"),
        "mean_distinct_ids": (attrs.get("quality") or {}).get("mean_distinct_ids"),
        "bytes_on_disk": total,
        "bytes_per_token": round(total / max(counts["tokens"], 1), 2),
        "bytes_per_response_token": round(total / max(counts["response_tokens"], 1), 2),
        "bytes_by_array": sizes,
        "mean_abs_kl_distortion": (attrs.get("quality") or {}).get("mean_abs_kl_distortion"),
        "mean_weighted_abs_logprob_error": (attrs.get("quality") or {}).get("mean_weighted_abs_logprob_error"),
        # Teacher top-k mass on embedding rows past the tokenizer (a teacher padded wider
        # than its tokenizer); a student narrower than the teacher drops at least this.
        "teacher_vocab_size": (attrs.get("teacher") or {}).get("vocab_size"),
        "tokenizer_size": (attrs.get("tokenizer") or {}).get("size"),
        "mean_topk_mass_past_tokenizer": (attrs.get("quality") or {}).get("mean_topk_mass_past_tokenizer"),
        "attributes": attrs,
    }


def list_caches(root: str | Path | None = None) -> list[dict[str, Any]]:
    """The caches directly under ``root`` (a folder or URL; default: the cache root)."""
    rows = []
    for location in caches_under(as_location(root) if root else cache_home()):
        try:
            store = CacheStore(location)
        except HPDError as exc:  # a damaged cache is listed as such; the others as usual
            rows.append({"key": location.url.rstrip("/").rsplit("/", 1)[-1], "teacher": "?", "data": str(exc), "k": 0, "tokens": 0,
                         "bytes": location.size(""), "complete": False, "damaged": True, "location": str(location)})
            continue
        a = store.attrs
        rows.append(
            {
                "key": store.key,
                "teacher": a["teacher"]["name"],
                "data": a["data"]["path"],
                "k": store.k,
                "tokens": a["counts"]["tokens"],
                "bytes": sum(store.bytes_on_disk().values()),
                "complete": store.complete,
                "damaged": False,
                "location": str(location),
            }
        )
    return rows
