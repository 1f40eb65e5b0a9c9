"""Content hashes that identify a teacher, a tokenizer and a chat template.

A cache's key is built from these, so they must depend on content, never on a
file's path or modification time.

A teacher folder is identified by its config (without the fields that only say
where it was loaded from) and the full SHA-256 of every weight file: any
changed byte (a LoRA merge, a partial fine-tune) changes the key. Hashing a
140 GB checkpoint takes a minute or two, so each file's digest is remembered in
``<cache root>/hash-memo.json`` by (absolute path, size, mtime_ns, inode) and
reused while all four match. That is the memo's contract, the one make and
rsync keep: an edit that keeps the size and restores the mtime (``os.utime``)
on the same inode is not noticed. Delete the memo file to rehash everything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import HPDError

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_CONFIG_FILES = ("config.json", "generation_config.json")

# SHA-256 from hashlib: no extra dependency, and with the CPU's SHA extensions
# (SHA-NI, on current x86 servers) the fastest hash hashlib has: measured here on
# 1 GiB, sha256 0.9-1.3 GB/s, blake2b 0.5-0.6 GB/s. Files are hashed in parallel
# threads (hashlib releases the GIL), so a sharded checkpoint hashes at several
# times one core's rate.
_FILE_HASH = "sha256"
_READ_BYTES = 16 << 20
_MAX_THREADS = 8
_MEMO_NAME = "hash-memo.json"
_MEMO_VERSION = 1
_MEMO_MAX_ENTRIES = 4096
# A file modified this recently may change again within the same mtime tick
# (coarse timestamps on some filesystems): hash it, but do not remember it.
_RACY_NS = 2_000_000_000
# Bytes to hash above which a progress line is shown (a few seconds of work).
_PROGRESS_BYTES = 4 << 30


def stable_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, the canonical form that is hashed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def hash_obj(obj: Any) -> str:
    return sha256_hex(stable_json(obj))


@dataclass(frozen=True)
class _Stamp:
    """What the memo trusts a file by: unchanged while all of these are."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, st: os.stat_result) -> "_Stamp":
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


def memo_path() -> Path:
    from .cache.layout import cache_root

    return cache_root() / _MEMO_NAME


def _read_memo(path: Path) -> dict[str, dict[str, Any]]:
    try:
        memo = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # unreadable or torn by hand: recompute, rewrite
        log.debug("ignoring hash memo %s: %s", path, exc)
        return {}
    if not isinstance(memo, dict) or memo.get("version") != _MEMO_VERSION or not isinstance(memo.get("files"), dict):
        return {}
    return memo["files"]


def _write_memo(path: Path, new: dict[str, dict[str, Any]]) -> bool:
    """Merge ``new`` into the memo file, written whole to a temporary name and renamed.

    Two processes writing at once each merge into what they read; the later
    rename wins and the other's new entries are lost, costing a rehash only.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files = {**_read_memo(path), **new}
        if len(files) > _MEMO_MAX_ENTRIES:  # keep the memo small: forget the oldest
            keep = sorted(files, key=lambda p: files[p].get("hashed_at", 0))[-_MEMO_MAX_ENTRIES:]
            files = {p: files[p] for p in keep}
        fd, tmp = tempfile.mkstemp(prefix=f".{_MEMO_NAME}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": _MEMO_VERSION, "hash": _FILE_HASH, "files": files}, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:  # a read-only cache root costs a rehash next time, nothing else
        log.warning("could not remember weight hashes in %s (%s); they will be recomputed next time", path, exc)
        return False
    return True


class _ByteProgress:
    """Thread-safe byte counter shown through :class:`Progress` in MB."""

    def __init__(self, total_bytes: int, desc: str):
        from .progress import Progress

        self.progress = Progress(total=max(total_bytes // 1_000_000, 1), unit="MB", desc=desc)
        self.lock = threading.Lock()
        self.bytes = 0
        self.shown = 0

    def add(self, n: int) -> None:
        with self.lock:
            self.bytes += n
            mb = self.bytes // 1_000_000
            if mb > self.shown:
                self.progress.update(mb - self.shown)
                self.shown = mb

    def close(self) -> None:
        with self.lock:
            self.progress.close()


def _hash_file(path: Path, progress: _ByteProgress | None) -> str:
    digest = hashlib.new(_FILE_HASH)
    buf = bytearray(_READ_BYTES)
    view = memoryview(buf)
    try:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                digest.update(view[:n])
                if progress is not None:
                    progress.add(n)
    except OSError as exc:
        raise HPDError(f"{path}: cannot read this weight file to identify the teacher ({exc.strerror or exc}); check its permissions") from None
    return digest.hexdigest()


def file_digests(paths: list[Path]) -> dict[Path, str]:
    """The full SHA-256 of each file, from the memo where its stamp still matches."""
    memo_file = memo_path()
    memo = _read_memo(memo_file)
    digests: dict[Path, str] = {}
    todo: list[tuple[Path, str, _Stamp]] = []
    for path in paths:
        real = os.path.realpath(path)  # a Hub snapshot links to its blobs: remember the blob
        stamp = _Stamp.of(os.stat(real))
        entry = memo.get(real)
        if entry and entry.get(_FILE_HASH) and _Stamp(entry.get("size"), entry.get("mtime_ns"), entry.get("inode")) == stamp:
            digests[path] = entry[_FILE_HASH]
        else:
            todo.append((path, real, stamp))
    if not todo:
        return digests
    total = sum(stamp.size for _, _, stamp in todo)
    progress = _ByteProgress(total, f"hashing {len(todo)} weight file(s)") if total > _PROGRESS_BYTES else None
    started = time.time()
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1, _MAX_THREADS))) as pool:
            results = list(pool.map(lambda item: _hash_file(item[0], progress), todo))
    finally:
        if progress is not None:
            progress.close()
    now_ns = time.time_ns()
    new: dict[str, dict[str, Any]] = {}
    for (path, real, stamp), digest in zip(todo, results):
        digests[path] = digest
        after = _Stamp.of(os.stat(real))
        if after == stamp and now_ns - stamp.mtime_ns >= _RACY_NS:  # unchanged while read, and not just written
            new[real] = {"size": stamp.size, "mtime_ns": stamp.mtime_ns, "inode": stamp.inode, _FILE_HASH: digest, "hashed_at": int(time.time())}
    if new and _write_memo(memo_file, new):
        log.info("hashed %d weight file(s) (%.2f GB, %.1f s); the hashes are remembered in %s", len(todo), total / 1e9, time.time() - started, memo_file)
    return digests


def hub_revision(model_dir: Path) -> str | None:
    """Hook for Hub models: the commit that pins a folder's content, when known.

    A later change resolves Hub ids (and folders downloaded from the Hub) to
    their commit here, so they are identified without hashing their weights.
    Until then every folder is identified by hashing its files.
    """
    return None


def model_hash(model_dir: str | os.PathLike) -> str:
    """Hash of a model folder's config and the full content of its weight files.

    Independent of the folder's path: two folders with the same files have the
    same hash.
    """
    root = Path(model_dir)
    digest = hashlib.sha256()
    for name in _CONFIG_FILES:
        if (root / name).is_file():
            config = json.loads((root / name).read_text())
            # Where the weights were loaded from does not change them.
            config.pop("_name_or_path", None)
            config.pop("transformers_version", None)
            digest.update(stable_json(config).encode())
    revision = hub_revision(root)
    if revision is not None:
        digest.update(f"hub-revision:{revision}".encode())
        return digest.hexdigest()
    weights = sorted(p for p in root.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    for path, file_digest in sorted(file_digests(weights).items()):
        digest.update(f"{path.name}:{_FILE_HASH}:{file_digest}".encode())
    return digest.hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    """Hash of a tokenizer's vocabulary, merges, normalisation and special tokens.

    Two tokenizers with the same hash turn every text into the same ids. The
    chat template is hashed separately (:func:`chat_template_hash`).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Truncation/padding settings are runtime state, not vocabulary.
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = {"vocab": sorted(tokenizer.get_vocab().items())}
    spec["special"] = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "add_bos": bool(getattr(tokenizer, "add_bos_token", False)),
    }
    return hash_obj(spec)


def chat_template_hash(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    if isinstance(template, dict):
        return hash_obj(template)
    return sha256_hex(template)
