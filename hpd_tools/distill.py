"""``distill``: train a student from teacher caches with HPD or a baseline loss.

``train`` reads top to bottom; the pieces live in ``hpd_tools.training``:

1. check ``--out`` (absent, empty or an earlier run of distill, writable) and,
   on resume, that the checkpoint's options are this run's (``run_folder``);
2. load the student, check it against every cache, build the stream (caches
   mixed by weight), AdamW, warmup + cosine (``state.Training``);
3. resume from the latest checkpoint when asked: weights, optimizer,
   scheduler, RNG and the stream's exact position (``checkpoint``);
4. each step: ``grad_accum`` micro-batches; the loss is summed over response
   tokens and divided once by the step's total count of response tokens, so
   accumulation equals one big batch; the student's [tokens, vocab] logits
   exist one chunk of ``loss_chunk_tokens`` at a time (recomputed in backward),
   so peak memory does not grow with batch-tokens x vocab (``student``);
5. log metrics (JSON lines, TensorBoard when installed; ``metrics``), eval
   (``evaluation``) and checkpoint at intervals (keeping the newest
   ``--keep-checkpoints``); a non-finite loss or gradient norm stops the run
   naming the step and the batch, before the optimizer steps, with the last
   good checkpoint kept;
6. save ``final/``, which ``AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

from typing import Any

from .errors import HPDError
from .parallel import World, init_world
from .progress import Progress
from .training.checkpoint import checkpoints, prune_checkpoints, save_checkpoint
from .training.config import DTYPES, DistillConfig, autocast, check_loss_options, lr_factor, resolve_dtype, set_matmul_precision
from .training.evaluation import evaluate
from .training.run_folder import RESUME_MAY_CHANGE, RUN_MARKER, cache_keys, check_out, check_resume, prepare_out, read_run_marker
from .training.state import Training
from .training.student import StudentLoss, check_caches, chunked_loss, load_student, micro_step, packing_works, to_targets

__all__ = [
    "DTYPES", "RESUME_MAY_CHANGE", "RUN_MARKER", "DistillConfig", "StudentLoss", "Training", "autocast", "cache_keys", "check_caches",
    "check_loss_options", "check_online_teacher_placement", "check_out", "check_resume", "checkpoints", "chunked_loss", "evaluate",
    "load_student", "lr_factor", "micro_step", "packing_works", "prune_checkpoints", "read_run_marker", "resolve_dtype", "save_checkpoint",
    "set_matmul_precision", "to_targets", "train",
]


def train(config: DistillConfig) -> dict[str, Any]:
    """Run (or resume) a distillation; returns the last logged metrics.

    Under torchrun every rank runs this; rank 0 alone writes --out (metrics,
    checkpoints, final/) and loads checkpoints, which it broadcasts.
    """
    config.validate()
    world = init_world()
    try:
        return _train(config, world)
    finally:
        world.close()


def check_online_teacher_placement(config: DistillConfig, world: World) -> None:
    """Refuse an in-process vLLM online teacher on more than one rank: vLLM's
    uniproc executor takes its GPU from its own local rank (0), not from the
    rank's device, so every rank's engine would land on GPU 0."""
    folder = config.online_teacher and not config.online_teacher.startswith(("http://", "https://"))
    if world.world_size > 1 and config.sample_every and folder and config.online_engine == "vllm":
        raise HPDError(f"--online-teacher {config.online_teacher} --online-engine vllm: under torchrun ({world.world_size} processes) every rank's "
                       "in-process vLLM engine would run on the first GPU; give --online-teacher URL (a running vLLM server) or --online-engine hf")


def _train(config: DistillConfig, world: World) -> dict[str, Any]:
    check_online_teacher_placement(config, world)
    # Rank 0 checks --out and decides whether and where to resume; every rank learns the outcome.
    ckpt, marker, problem = prepare_out(config, world) if world.main else (None, None, None)
    ckpt, problem = world.broadcast((ckpt, problem))
    if problem:
        raise HPDError(problem)
    run = Training(config, world, ckpt)
    if ckpt is not None:
        run.resume(ckpt)
    run.start(marker)
    progress = Progress(total=config.max_steps, unit="steps", desc=f"distill {config.loss}") if world.main else None
    if progress is not None:
        progress.update(run.step, count_rate=False)
    logged: dict[str, Any] = {}
    latest_round: dict[str, Any] = {}
    latest_eval: dict[str, Any] = {}
    try:
        for step in range(run.step, config.max_steps):
            if run.onpolicy is not None and step % config.sample_every == 0:
                latest_round = run.log(step, run.sample_round())
            result = run.train_step(step)
            done = step + 1
            if done % config.log_every == 0 or done == config.max_steps:
                logged = run.log(done, run.step_metrics(result))
            if config.eval_cache and ((config.eval_every and done % config.eval_every == 0) or done == config.max_steps):
                latest_eval = run.log(done, run.evaluate())
            if config.save_every and done % config.save_every == 0 and done < config.max_steps:
                run.save(done)
            if progress is not None:
                rate = f" {logged['tokens_per_s']:,.0f} tok/s" if logged.get("tokens_per_s") else ""
                rkl = f" on-policy rkl {latest_round['onpolicy/rkl']:.3f}" if "onpolicy/rkl" in latest_round else ""
                progress.desc = f"distill {config.loss} step {done} loss {result.loss:.4f}{rate}{rkl}"
                progress.update(1)
        run.save(config.max_steps)
    finally:
        if progress is not None:
            progress.close()
        run.close()
    run.save_final()
    return {**logged, **latest_round, **latest_eval}
