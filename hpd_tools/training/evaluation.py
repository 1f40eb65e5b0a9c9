"""Held-out evaluation: forward KL to the teacher on its top-k support and the
NLLs of the data tokens, per response token; with an online teacher, forward
KL to its full distribution too."""

from __future__ import annotations

from typing import Any

import torch

from ..cache.reader import CacheReader
from ..parallel import World
from .config import DistillConfig, autocast
from .dense import DenseTeacher
from .student import as_step_module, to_targets


@torch.no_grad()
def evaluate(model: Any, path: str, config: DistillConfig, device: torch.device, world: World | None = None,
             teacher: DenseTeacher | None = None) -> dict[str, float]:
    """Per response token: forward KL to the teacher on its top-k support, the
    teacher's NLL of the data tokens (a fixed reference) and the student's, and
    the teacher mass on top-k ids past the student's logits width, which the KL
    leaves out (``eval/dropped_teacher_mass``; see hpd_tools.losses, "Widths").
    With ``teacher`` (``--eval-teacher``), ``eval/full_fkl``: the mean over
    response tokens of sum_v p(v) (log p(v) - log q(v)) against the teacher's
    full distribution, computed on the same batches in float32 per loss chunk
    and summed in float64: one yardstick for top-k, sampled and dense runs.

    Under torchrun, batch i is evaluated by rank i mod world_size and the sums
    are added up; every rank runs the same number of forwards (FSDP2 needs them
    in step), the short ones repeating a batch with weight 0."""
    world = world or World()
    step_module = as_step_module(model, config)
    reader = CacheReader(path, shuffle=False)
    n = len(reader.batch_plan(config.batch_tokens))
    if config.eval_batches:
        n = min(n, config.eval_batches)
    rounds = -(-n // world.world_size)
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    was_training = step_module.training
    step_module.eval()
    done, last = 0, None
    with autocast(config.dtype, device):  # the training forward's precision
        for i, batch in enumerate(reader.batches(config.batch_tokens)):
            if i >= n:
                break
            last = batch
            if i % world.world_size == world.rank:
                inputs, t = to_targets(batch, device)
                sums += step_module(inputs, torch.from_numpy(batch.loss_mask).to(device), t, evaluate=True, teacher=teacher)
                done += 1
        while last is not None and done < rounds:  # keep FSDP2's collectives in step
            inputs, t = to_targets(last, device)
            step_module(inputs, torch.from_numpy(last.loss_mask).to(device), t, evaluate=True)
            done += 1
    step_module.train(was_training)
    fkl, student_nll, teacher_nll, count, dropped, full_fkl = world.sum(sums.tolist())
    c = max(count, 1)
    out = {"eval/fkl_topk": fkl / c, "eval/student_nll": student_nll / c, "eval/teacher_nll": teacher_nll / c, "eval/dropped_teacher_mass": dropped / c}
    if teacher is not None:
        out["eval/full_fkl"] = full_fkl / c
    return {**out, "eval/tokens": int(count)}

