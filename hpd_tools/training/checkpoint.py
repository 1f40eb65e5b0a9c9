"""Checkpoints: step-N/ folders (the student in HF format, optimizer and
scheduler, meta.json with every data slot's stream position and RNG and every
rank's torch, CUDA and rollout RNG), written under .tmp and renamed, pruned to
the newest ``--keep-checkpoints``; and reading them back."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import HPDError
from ..parallel import full_state

if TYPE_CHECKING:
    from .state import Training

log = logging.getLogger("hpd_tools.distill")  # the command's logger: what users and -v filter on


def checkpoints(out: Path) -> list[Path]:
    """The step-N folders in ``out``, oldest first (by N: step-1000000 follows step-999999)."""
    found = [p for p in out.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
        int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HPDError(f"--resume {ckpt}: its meta.json is unreadable ({type(exc).__name__}: {exc}); remove that checkpoint folder to resume from the one before") from None
    return meta


def _cuda_rng() -> list[list[int]] | None:
    """Every CUDA device's generator state (HF ``generate`` samples with it on a
    GPU); None without CUDA."""
    return [state.tolist() for state in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None


def _restore_cuda_rng(states: list[list[int]] | None, ckpt: Path) -> None:
    """The CUDA generators as the checkpoint saved them, when there are as many
    devices now; else a warning (on-policy samples then differ from an
    uninterrupted run's; the cached-data steps do not, their noise is on the CPU)."""
    if not torch.cuda.is_available():
        return
    if states is not None and len(states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(state, dtype=torch.uint8) for state in states])
        return
    saved = "no CUDA generators" if states is None else f"the CUDA generators of {len(states)} devices"
    log.warning("--resume %s: the checkpoint holds %s, this process sees %d devices; on-policy rollouts will not repeat the uninterrupted run's", ckpt, saved, torch.cuda.device_count())


def prune_checkpoints(out: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (0: keep all).
    Complete: renamed from .tmp, with its meta.json; a .tmp being written is
    never touched and the newest complete checkpoint never deleted. A folder is
    renamed out of the step-* names before it is deleted, so a crash mid-way
    leaves no half-deleted checkpoint to resume from. Returns what was deleted."""
    for stale in out.glob(".deleting-step-*"):  # an earlier prune that did not finish
        shutil.rmtree(stale, ignore_errors=True)
    if keep <= 0:
        return []
    complete = [p for p in checkpoints(out) if (p / "meta.json").is_file()]
    deleted = []
    for old in complete[:-keep]:
        doomed = out / f".deleting-{old.name}"
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        deleted.append(old)
    return deleted



def _rng_state(gen: torch.Generator | None) -> list[int] | None:
    return gen.get_state().tolist() if gen is not None else None


def _set_rng(gen: torch.Generator, state: list[int]) -> None:
    gen.set_state(torch.tensor(state, dtype=torch.uint8))


def save_checkpoint(run: Training, step: int) -> Path:
    """step-XXXXXX/ of ``run`` at ``step``: the student (HF format), optimizer
    (keyed by parameter name) + scheduler, and meta.json (config, step, every data
    slot's stream position and RNG, every rank's torch, CUDA and rollout RNG,
    ``run.meta``: the caches' keys, the schedule's horizon, the resolved dtype).
    Rank 0 writes it under .tmp and renames, then keeps the newest
    ``--keep-checkpoints``; a collective under torchrun (every rank calls it)."""
    world, config, out = run.world, run.config, run.out
    model_state, optim_state = full_state(run.model, run.optimizer, world, fsdp=config.fsdp)
    slots: dict[str, Any] = {}
    for part in world.gather({"stream": run.batches.state()["slots"], "noise": {str(j): _rng_state(g) for j, g in run.noise.items()}}):
        for j, st in part["stream"].items():
            slots.setdefault(j, {})["stream"] = st
        for j, st in part["noise"].items():
            slots[j]["noise_rng"] = st
    onpolicy_parts = world.gather((run.onpolicy.state(), run.onpolicy.buffer_arrays())) if run.onpolicy is not None else None
    ranks = world.gather({"torch_rng": torch.get_rng_state().tolist(), "cuda_rng": _cuda_rng(), "rollout_rng": _rng_state(run.rollout_noise)})
    final = out / f"step-{step:06d}"
    if world.main:
        tmp = out / f"step-{step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        run.model.save_pretrained(tmp / "model", state_dict=model_state)
        run.tokenizer.save_pretrained(tmp / "model")
        torch.save({"optimizer": optim_state, "scheduler": run.scheduler.state_dict()}, tmp / "optimizer.pt")
        meta = {
            "step": step,
            "config": asdict(config),
            "world_size": world.world_size,
            "n_slots": world.world_size * config.grad_accum,
            "slots": slots,
            "ranks": ranks,
            "metrics_rows": run.metrics.rows if run.metrics is not None else 0,
            **run.meta,
        }
        if onpolicy_parts is not None:
            meta["onpolicy"] = [state for state, _ in onpolicy_parts]
            for r, (_, arrays) in enumerate(onpolicy_parts):
                np.savez(tmp / f"onpolicy-rank{r}.npz", **arrays)
        (tmp / "meta.json").write_text(json.dumps(meta))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in prune_checkpoints(out, config.keep_checkpoints):
            log.info("--keep-checkpoints %d: deleted %s", config.keep_checkpoints, old)
    world.barrier()
    return final


def load_weights(model: Any, ckpt: Path, student: str) -> None:
    """The checkpoint's weights into the (unwrapped) student."""
    from transformers import AutoModelForCausalLM

    try:
        model.load_state_dict(AutoModelForCausalLM.from_pretrained(ckpt / "model", dtype=torch.float32).state_dict())
    except RuntimeError as exc:  # another architecture
        raise HPDError(f"--resume {ckpt}: its weights do not fit --student {student} ({str(exc).splitlines()[0]}); resume with the student the run started from") from None


def restore_rng(run: Training, ckpt: Path, meta: dict[str, Any]) -> None:
    """Every data slot's noise, and this rank's torch, CUDA and rollout generators
    (rank 0's when the checkpoint had another number of processes)."""
    for j, gen in run.noise.items():
        _set_rng(gen, meta["slots"][str(j)]["noise_rng"])
    mine = meta["ranks"][run.world.rank] if meta["world_size"] == run.world.world_size else meta["ranks"][0]
    torch.set_rng_state(torch.tensor(mine["torch_rng"], dtype=torch.uint8))
    _restore_cuda_rng(mine.get("cuda_rng"), ckpt)
    if mine["rollout_rng"] is not None:
        _set_rng(run.rollout_noise, mine["rollout_rng"])
