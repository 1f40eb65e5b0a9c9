"""Held-out evaluation: forward KL to the teacher on its top-k support and the
NLLs of the data tokens, per response token."""

from __future__ import annotations

from typing import Any

import torch

from ..cache.reader import CacheReader
from ..parallel import World
from .config import DistillConfig, autocast
from .student import as_step_module, to_targets


@torch.no_grad()
def evaluate(model: Any, path: str, config: DistillConfig, device: torch.device, world: World | None = None) -> dict[str, float]:
    """Per response token: forward KL to the teacher on its top-k support, the
    teacher's NLL of the data tokens (a fixed reference) and the student's, and
    the teacher mass on top-k ids past the student's logits width, which the KL
    leaves out (``eval/dropped_teacher_mass``; see hpd_tools.losses, "Widths").

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
    sums = torch.zeros(5, dtype=torch.float64, device=device)
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
                sums += step_module(inputs, torch.from_numpy(batch.loss_mask).to(device), t, evaluate=True)
                done += 1
        while last is not None and done < rounds:  # keep FSDP2's collectives in step
            inputs, t = to_targets(last, device)
            step_module(inputs, torch.from_numpy(last.loss_mask).to(device), t, evaluate=True)
            done += 1
    step_module.train(was_training)
    fkl, student_nll, teacher_nll, count, dropped = world.sum(sums.tolist())
    c = max(count, 1)
    return {"eval/fkl_topk": fkl / c, "eval/student_nll": student_nll / c, "eval/teacher_nll": teacher_nll / c, "eval/dropped_teacher_mass": dropped / c, "eval/tokens": int(count)}

