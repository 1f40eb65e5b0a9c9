"""The run folder: what ``--out`` may be, its marker, and whether a checkpoint
continues this run (resume) or is refused.

--out is absent, empty, or a run that distill itself made: a folder with its
marker, hpd-run.json (format, version, the run's id and its latest config).
Anything else (a model, a cache, a folder of other files, an input's folder)
is refused before anything is loaded or written.
"""

from __future__ import annotations

import inspect
import json
import os
import time
import uuid
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..cache.layout import CacheStore, is_cache
from ..errors import HPDError
from ..losses import LOSSES
from ..outputs import model_files, probe_writable
from ..parallel import World
from .checkpoint import checkpoints, read_meta
from .config import DistillConfig, _flag, _is_int, resolve_dtype

RUN_MARKER = "hpd-run.json"
RUN_FORMAT = "hpd-tools distill run"
RUN_FORMAT_VERSION = 1


def _local(path: str | None) -> Path | None:
    """A local input path, resolved; None for a URL or no path."""
    if not path or ("://" in path and not path.startswith("file://")):
        return None
    return Path(path.removeprefix("file://")).expanduser().resolve()


def read_run_marker(out: Path) -> dict[str, Any] | None:
    """The marker of the run in ``out``; None when there is none."""
    path = out / RUN_MARKER
    if not path.exists():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HPDError(f"--out {out}: {RUN_MARKER} is unreadable ({exc}); choose another --out") from None
    if not isinstance(marker, dict) or marker.get("format") != RUN_FORMAT or not _is_int(marker.get("format_version")):
        raise HPDError(f"--out {out}: {RUN_MARKER} is not a distill run marker; choose another --out")
    if marker["format_version"] > RUN_FORMAT_VERSION:
        raise HPDError(f"--out {out}: a run of a newer hpd-tools (run format {marker['format_version']}, this version reads {RUN_FORMAT_VERSION}); continue it with that version or choose another --out")
    return marker


def _legacy_run(out: Path) -> bool:
    """A run from before the marker: a config.json holding a DistillConfig (not a
    model's config) next to metrics or checkpoints. Accepted, and marked when it
    is continued."""
    try:
        values = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(values, dict) or not {"caches", "student", "loss"} <= set(values) or "model_type" in values:
        return False
    return (out / "metrics.jsonl").is_file() or bool(checkpoints(out))


def check_out(config: DistillConfig) -> dict[str, Any] | None:
    """Refuse an ``--out`` that is not absent, empty or an earlier run; check it is
    writable. Reads only. Returns the earlier run's marker (None for a new folder
    or a run from before markers)."""
    raw = str(config.out)  # a Path from Python callers, too
    if "://" in raw:
        raise HPDError(f"--out {raw}: the run folder must be a local path")
    target = Path(raw).resolve()
    inputs = [("--student", config.student), *(("--cache", c) for c in config.caches), ("--eval-cache", config.eval_cache),
              ("--prompt-cache", config.prompt_cache), ("--online-teacher", config.online_teacher)]
    for flag, given in inputs:
        path = _local(given)
        if path is None:
            continue
        if path == target:
            raise HPDError(f"--out {raw}: is the {flag} folder; distill writes checkpoints, metrics and final/ into --out: choose a new folder")
        if path in target.parents:
            raise HPDError(f"--out {raw}: is inside the {flag} folder {given}; choose a folder outside the inputs")
        if target in path.parents:
            raise HPDError(f"{flag} {given}: is inside --out {raw}, where distill replaces checkpoints and final/; copy it elsewhere or choose another --out")
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise HPDError(f"--out {raw}: " + ("a file, not a folder" if existing == target else f"under {existing}, which is a file") + "; choose a folder")
    for folder in (existing, *existing.parents):
        if (folder / "zarr.json").is_file() and is_cache(folder):
            raise HPDError(f"--out {raw}: {'is' if folder == target else 'is inside'} the hpd-tools cache {folder}; choose a folder outside caches")
    marker = None
    if existing == target:
        model = model_files(target)
        if model:
            raise HPDError(f"--out {raw}: holds a model ({', '.join(model[:3])}); distill never writes into a model folder: choose a new or empty folder")
        marker = read_run_marker(target)
        if marker is None and not _legacy_run(target):
            try:
                entries = sorted(p.name for p in target.iterdir())
            except OSError as exc:
                raise HPDError(f"--out {raw}: cannot list it ({exc.strerror or exc}); choose another folder") from None
            if entries:
                shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
                raise HPDError(f"--out {raw}: not empty ({shown}) and not a distill run (no {RUN_MARKER}); choose a new or empty folder")
    probe_writable(existing, "--out", raw)
    return marker


def write_run_marker(out: Path, previous: dict[str, Any] | None, config: DistillConfig) -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    previous = previous or {}
    marker = {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, "run_id": previous.get("run_id") or uuid.uuid4().hex,
              "created": previous.get("created") or now, "updated": now, "hpd_tools_version": __version__, "config": asdict(config)}
    tmp = out / f".{RUN_MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=2))
    os.replace(tmp, out / RUN_MARKER)
    return marker


# -- resume: the same run, or refused ----------------------------------------------

# What a resumed run may change, and why that leaves the run the same. Every
# other DistillConfig field must equal the checkpoint's (docs/distill.md, Resume).
RESUME_MAY_CHANGE = {
    "max_steps": "where the run stops; the learning-rate schedule keeps the horizon the run started with",
    "eval_cache": "evaluation only",
    "eval_every": "evaluation only",
    "eval_batches": "evaluation only",
    "eval_teacher": "evaluation only",
    "save_every": "checkpoints only",
    "log_every": "logging only",
    "report_to": "logging only",
    "loss_chunk_tokens": "memory only: the chunked loss equals the unchunked one",
    "keep_checkpoints": "checkpoints only",
    "attn_implementation": "how attention is computed, not what: the implementations compute the same function",
    "grad_accum": "checked as the slot count, processes x --grad-accum",
    "fsdp": "checkpoints hold whole tensors",
    "student": "the weights come from the checkpoint",
    "online_engine": "how the online teacher runs, not which",
    "online_engine_args": "how the online teacher runs, not which",
    "out": "the run's folder",
    "resume": "the flag itself",
}
_ONPOLICY = ("online_teacher", "sample_prompts", "sample_max_new_tokens", "sample_temperature", "onpolicy_weight", "onpolicy_buffer", "prompt_cache")
_DEFAULTS = {f.name: (f.default if f.default is not MISSING else f.default_factory()) for f in fields(DistillConfig) if f.default is not MISSING or f.default_factory is not MISSING}


def cache_keys(config: DistillConfig) -> dict[str, Any]:
    """The keys of the run's caches (its identity: a moved cache keeps its key)."""
    prompt = (config.prompt_cache or config.caches[0]) if config.sample_every else None
    return {"caches": [CacheStore(c).attrs.get("key") for c in config.caches], "prompt_cache": CacheStore(prompt).attrs.get("key") if prompt else None}


def _run_options(values: dict[str, Any], keys: dict[str, Any] | None) -> dict[str, Any]:
    """The options that define a run, normalised so that the same run compares
    equal: caches by key when known, weights as shares, loss options with their
    defaults, on-policy options only with rounds."""
    v = {**_DEFAULTS, **values}
    opts = {name: v[name] for name in (f.name for f in fields(DistillConfig)) if name not in RESUME_MAY_CHANGE}
    path = lambda p: str(_local(p) or p)  # noqa: E731
    opts["caches"] = keys["caches"] if keys else [path(c) for c in v["caches"]]
    weights = [float(w) for w in v["cache_weights"] or [1.0] * len(v["caches"])]
    opts["cache_weights"] = [round(w / sum(weights), 12) for w in weights]
    fn = LOSSES.get(v["loss"])
    defaults = {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY} if fn else {}
    opts["loss_options"] = {**defaults, **v["loss_options"]}
    opts["betas"] = [float(b) for b in v["betas"]]
    opts["pack_width"] = (v["pack_width"] or v["batch_tokens"]) if v["pack"] else 0
    for name in ("lr", "min_lr_ratio", "weight_decay", "max_grad_norm", "sample_temperature", "onpolicy_weight"):
        opts[name] = float(v[name])
    if v["sample_every"]:
        teacher = v["online_teacher"] or ""
        opts["online_teacher"] = "a URL" if teacher.startswith(("http://", "https://")) else path(teacher)  # a server may move
        opts["prompt_cache"] = keys["prompt_cache"] if keys else path(v["prompt_cache"] or v["caches"][0])
    else:
        opts.update(dict.fromkeys(_ONPOLICY))
    return opts


def _show(name: str, value: Any) -> str:
    flag = _flag(name)
    if name in ("caches", "cache_weights"):
        return " ".join(f"{flag} {x:g}" if isinstance(x, float) else f"{flag} {x}" for x in value) or f"(no {flag})"
    if name == "loss_options":
        return " ".join(f"{flag} {k}={x}" for k, x in value.items()) or f"(no {flag})"
    if name == "betas":
        return f"{flag} {' '.join(f'{float(b):g}' for b in value)}"
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return f"(no {flag})" if value is None else f"{flag} {value}"


def check_resume(ckpt: Path, meta: dict[str, Any], config: DistillConfig, device: torch.device | None = None) -> None:
    """The checkpoint continues this run: every option outside RESUME_MAY_CHANGE
    equals the checkpoint's; one line names each change with both values.
    ``--dtype`` is compared as resolved (``auto`` on this ``device`` against the
    dtype the checkpoint's run resolved it to)."""
    step = int(meta["step"])
    if config.max_steps < step:
        raise HPDError(f"--max-steps {config.max_steps}: the checkpoint {ckpt} is at step {step}; give at least {step}")
    saved = {**_DEFAULTS, **meta.get("config", {})}
    mine = asdict(config)
    theirs_keys = meta.get("cache_keys")
    keys = cache_keys(config) if theirs_keys else None
    a, b = _run_options(saved, theirs_keys), _run_options(mine, keys)
    # Checkpoints from before "auto" hold float32 or bfloat16 in their config.
    a["dtype"] = meta.get("dtype") or resolve_dtype(saved["dtype"], torch.device("cpu"))
    b["dtype"] = resolve_dtype(mine["dtype"], device or torch.device("cpu"))
    resolved = lambda raw, value: f"auto ({value})" if raw == "auto" else raw  # noqa: E731
    saved["dtype"], mine["dtype"] = resolved(saved["dtype"], a["dtype"]), resolved(mine["dtype"], b["dtype"])
    changed = [name for name in a if a[name] != b[name]]
    if "sample_every" in changed and 0 in (saved["sample_every"], mine["sample_every"]):
        changed = [name for name in changed if name not in _ONPOLICY or name == "online_teacher"]
    if "loss" in changed and saved["loss_options"] == mine["loss_options"]:  # only the defaults differ
        changed.remove("loss_options")
    if not changed:
        return
    # Loss options with their defaults, unless the loss itself changed.
    # (only the loss options that differ: defaults both sides agree on say nothing)
    la, lb = a["loss_options"], b["loss_options"]
    differ = [key for key in {**la, **lb} if la.get(key) != lb.get(key)]
    shown = {} if "loss" in changed else {"loss_options": ({k: la[k] for k in differ if k in la}, {k: lb[k] for k in differ if k in lb})}
    before = " ".join(_show(n, shown[n][0] if n in shown else saved[n]) for n in changed)
    after = " ".join(_show(n, shown[n][1] if n in shown else mine[n]) for n in changed)
    if before == after:  # the same paths, other caches there now
        after += " (other caches at those paths)"
    may = ", ".join(_flag(n) for n in RESUME_MAY_CHANGE if n not in ("out", "resume", "student", "online_engine_args"))
    raise HPDError(f"--resume {ckpt}: the checkpoint was trained with {before}, this run asks for {after}; "
                   f"resume with the checkpoint's options or start a new run in another --out (a resumed run may change only {may})")


def find_resume(out: Path, config: DistillConfig, world: World) -> Path | None:
    """Rank 0's view of --out: the checkpoint to resume from (checked against this
    run's options), or an HPDError saying why the run may not start."""
    existing = checkpoints(out) if out.exists() else []
    if config.resume and existing:
        ckpt = existing[-1]
        meta = read_meta(ckpt)
        n_slots = world.world_size * config.grad_accum
        if meta.get("n_slots") != n_slots:
            raise HPDError(
                f"--resume {ckpt}: written with {meta.get('n_slots')} data slots ({meta.get('world_size')} processes x --grad-accum "
                f"{meta.get('config', {}).get('grad_accum')}), this run has {n_slots} ({world.world_size} x {config.grad_accum}); "
                "resume with processes x --grad-accum equal to the checkpoint's"
            )
        if "onpolicy" in meta and meta.get("world_size") != world.world_size:
            raise HPDError(f"--resume {ckpt}: on-policy state was saved by {meta.get('world_size')} processes; resume it with as many")
        check_resume(ckpt, meta, config, world.device)
        return ckpt
    if not config.resume and (existing or (out / "metrics.jsonl").exists()):
        raise HPDError(f"--out {out}: holds an earlier run; pass --resume to continue it, or choose another --out")
    return None


def prepare_out(config: DistillConfig, world: World) -> tuple[Path | None, dict[str, Any] | None, str | None]:
    """Rank 0: the guards on --out, then the checkpoint to resume from. A problem is
    returned, not raised, so that every rank learns it."""
    try:
        marker = check_out(config)
        return find_resume(Path(config.out), config, world), marker, None
    except HPDError as exc:
        return None, None, str(exc)
