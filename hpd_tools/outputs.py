"""Where commands write: checked before any expensive work, so nothing a user owns
(a model, a cache, a data file, an unrelated folder) is ever written or removed
by a command that did not make it.

A command's output folder must be absent, empty, or an earlier output of the
same command, recognised by the marker file that command writes into it (never
by the mere presence of a config.json). An output file must not be one of the
command's inputs, a folder, or inside a model or cache folder. Both must be
writable: a probe file is created and removed in the nearest existing folder,
so a read-only or full filesystem, or a file in the way, fails in one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Iterable

from .errors import HPDError

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "*.pth", "*.safetensors.index.json")


def model_files(folder: Path) -> list[str]:
    """What makes ``folder`` a model folder: a model's config.json (one naming a
    model type or architecture, not any config.json), weight files."""
    found = sorted({p.name for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern)})
    try:
        values = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return found
    return (["config.json"] if isinstance(values, dict) and ("model_type" in values or "architectures" in values) else []) + found


def _cache_at_or_above(path: Path) -> Path | None:
    from .cache.layout import is_cache

    for folder in (path, *path.parents):
        if (folder / "zarr.json").is_file() and is_cache(folder):
            return folder
    return None


def probe_writable(folder: Path, option: str, raw: str) -> None:
    """Create and remove a file in ``folder``: a read-only or full filesystem, or a
    folder without write permission, stops the command before its expensive work."""
    probe = folder / f".hpd-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink()
        raise HPDError(f"{option} {raw}: cannot write in {folder} ({exc.strerror or exc}); choose a writable folder") from None


def _nearest_existing(target: Path, option: str, raw: str) -> Path:
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir() and existing != target:
        raise HPDError(f"{option} {raw}: under {existing}, which is a file; choose a location under a folder")
    return existing


def _check_inputs(target: Path, option: str, raw: str, inputs: Iterable[tuple[str, str | os.PathLike | None]]) -> None:
    for flag, given in inputs:
        if not given or "://" in str(given):
            continue
        path = Path(given).expanduser().resolve()
        if path == target:
            raise HPDError(f"{option} {raw}: is the {flag} input; choose another location")
        if path in target.parents and path.is_dir():
            raise HPDError(f"{option} {raw}: is inside the {flag} folder {given}; choose a location outside the inputs")
        if target in path.parents:
            raise HPDError(f"{flag} {given}: is inside {option} {raw}, which this command replaces; choose another {option}")


def check_output_folder(raw: str | os.PathLike, option: str, *, marker: str, inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
                        legacy: Iterable[str] = ()) -> bool:
    """Refuse an output folder that is not absent, empty, or an earlier output of
    this command (holding ``marker``, or one of the ``legacy`` files older versions
    left); check it is writable. Returns whether it is an earlier output."""
    raw = str(raw)
    target = Path(raw).expanduser().resolve()
    _check_inputs(target, option, raw, inputs)
    existing = _nearest_existing(target, option, raw)
    if existing == target and not target.is_dir():
        raise HPDError(f"{option} {raw}: a file, not a folder; choose a folder")
    cache = _cache_at_or_above(existing)
    if cache is not None:
        raise HPDError(f"{option} {raw}: {'is' if cache == target else 'is inside'} the hpd-tools cache {cache}; choose a folder outside caches")
    earlier = False
    if existing == target:
        earlier = (target / marker).is_file() or any((target / name).exists() for name in legacy)
        if not earlier:
            model = model_files(target)
            if model:
                raise HPDError(f"{option} {raw}: holds a model ({', '.join(model[:3])}) this command did not make; choose a new or empty folder")
            entries = sorted(p.name for p in target.iterdir())
            if entries:
                shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
                raise HPDError(f"{option} {raw}: not empty ({shown}) and not an earlier output of this command (no {marker}); choose a new or empty folder")
    probe_writable(existing, option, raw)
    return earlier


def check_output_file(raw: str | os.PathLike, option: str, *, inputs: Iterable[tuple[str, str | os.PathLike | None]] = ()) -> None:
    """Refuse an output file that is an input, a folder, or inside a model or cache
    folder; check its folder is writable."""
    raw = str(raw)
    target = Path(raw).expanduser().resolve()
    _check_inputs(target, option, raw, inputs)
    if target.is_dir():
        raise HPDError(f"{option} {raw}: is a folder; give a file name")
    existing = _nearest_existing(target.parent, option, raw)
    cache = _cache_at_or_above(existing)
    if cache is not None:
        raise HPDError(f"{option} {raw}: is inside the hpd-tools cache {cache}; choose a file outside caches")
    if existing == target.parent and model_files(existing):
        raise HPDError(f"{option} {raw}: is inside a model folder ({existing}); choose a file outside it")
    probe_writable(existing, option, raw)
