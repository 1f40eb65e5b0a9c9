"""One run's state, as one object: the student (wrapped for DDP/FSDP2), its
optimizer and schedule, the stream of cached batches, every generator, the
on-policy rounds and the metrics file; with the three things the loop does to
it: ``resume`` (from a checkpoint), ``train_step`` (one optimizer step) and
``save`` (a checkpoint)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cache.reader import Batch, CachedSequence, collate
from ..errors import HPDError
from ..hashing import tokenizer_hash
from ..parallel import World, full_state, load_optimizer, wrap
from ..stream import Prefetcher, StepStream
from .checkpoint import load_weights, restore_rng, save_checkpoint
from .config import DistillConfig, lr_factor, resolve_dtype, set_matmul_precision
from .evaluation import evaluate
from .metrics import Metrics
from .run_folder import write_run_marker
from .student import StudentLoss, check_caches, check_signal, check_widths, load_student, micro_step, packing_works, to_targets

log = logging.getLogger("hpd_tools.distill")  # the command's logger: what users and -v filter on


def noise_generator(seed: int, stream: int) -> torch.Generator:
    """The HPD sampler's noise for one data slot (``stream`` >= 0) or one rank's rollouts (< 0)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, stream + (1 << 20)]).generate_state(1)[0]))


def _sequences(batches: list[Batch]) -> str:
    """The step's sequence indices, as an error message shows them."""
    seqs = [int(i) for b in batches for i in b.indices]
    return f"{seqs[:8]}{'...' if len(seqs) > 8 else ''}"


@dataclasses.dataclass
class StepResult:
    """What one optimizer step measured (global: summed over ranks)."""

    loss: float
    lr: float
    grad_norm: float
    response_tokens: int
    stats: dict[str, float]  # the loss's diagnostic sums over the step's response tokens
    onpolicy_loss: float | None
    onpolicy_weight: float


class Training:
    """Built from the options (and, on resume, the checkpoint's weights and
    meta.json, read by rank 0 and broadcast): the student on its device,
    checked against every cache, wrapped for DDP/FSDP2, AdamW, warmup + cosine
    over the run's first ``--max-steps``, the stream, the generators."""

    def __init__(self, config: DistillConfig, world: World, ckpt: Path | None = None):
        self.config, self.world, self.out = config, world, Path(config.out)
        torch.manual_seed(config.seed + world.rank)  # on-policy sampling: each rank its own draws
        self.device = device = world.device
        self.dtype = dtype = resolve_dtype(config.dtype, device)  # once: the loop, evaluation and checkpoints use the resolved value
        set_matmul_precision(dtype, device)
        log.info("precision: %s on %s%s", "bfloat16 autocast, float32 weights" if dtype == "bfloat16" else "float32",
                 device, " (TF32 matmuls)" if device.type == "cuda" and dtype == "float32" else "")
        self.step_config = dataclasses.replace(config, dtype=dtype)
        self.model, self.tokenizer = load_student(config.student, config.attn_implementation)
        stores = check_caches(config.caches, self.tokenizer)
        check_signal(config, stores)
        if config.eval_cache:
            check_caches([config.eval_cache], self.tokenizer, what="--eval-cache")
        if self.model.get_output_embeddings() is None or not hasattr(self.model, "base_model"):
            raise HPDError(f"--student {config.student}: no output embedding (LM head) to distill into")
        check_widths(config, self.model, self.tokenizer, stores)
        self._check_packing()
        self.dense_teacher, self.eval_teacher = self._load_teachers()

        self.slots = list(range(world.rank * config.grad_accum, (world.rank + 1) * config.grad_accum))
        stream = StepStream(config.caches, slots=self.slots, n_slots=world.world_size * config.grad_accum, weights=config.cache_weights or None,
                            batch_tokens=config.batch_tokens, seed=config.seed, packed=config.pack, pack_width=config.pack_width or None)
        self.k = stream.k
        self.stream = stream
        self.batches: Prefetcher | None = None  # started by ``start``, after any resume
        self.noise = {j: noise_generator(config.seed, j) for j in self.slots}
        self.rollout_noise = noise_generator(config.seed, -1 - world.rank)
        # What every checkpoint records about the run besides its config: the caches'
        # identity (a moved cache keeps its key), the schedule's horizon, the dtype.
        self.meta: dict[str, Any] = {"cache_keys": {"caches": [s.key for s in stores], "prompt_cache": None}, "dtype": dtype}
        self.onpolicy = self._make_onpolicy() if config.sample_every else None

        saved = world.broadcast(json.loads((ckpt / "meta.json").read_text()) if ckpt is not None and world.main else None)
        if ckpt is not None and world.main:
            load_weights(self.model, ckpt, config.student)
        self.model.to(device).train()
        if ckpt is not None and world.distributed:  # ranks other than 0 take rank 0's weights
            for tensor in self.model.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
        self.module = wrap(StudentLoss(self.model, self.step_config), self.model, world, fsdp=config.fsdp, dtype=dtype)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
        # The schedule's horizon is the run's first --max-steps: a resumed run that
        # stops later or earlier follows the same learning rates (flat after it).
        horizon = int(saved.get("schedule_steps") or saved["config"]["max_steps"]) if saved is not None else config.max_steps
        self.meta["schedule_steps"] = horizon
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, config, horizon))
        self.saved = saved  # the checkpoint's meta.json, for resume
        self.step = 0
        self.metrics: Metrics | None = None
        self.window_tokens, self.window_start = 0, time.time()
        self._marker: dict[str, Any] | None = None
        self._root_ready = False

    # -- set-up --------------------------------------------------------------------

    def _check_packing(self) -> None:
        config = self.config
        if not config.pack:
            return
        if not packing_works(self.model):
            raise HPDError(f"--pack: the student {config.student} ({type(self.model).__name__}) mixes packed sequences (its attention does not follow position-id boundaries); train without --pack")
        attention = getattr(self.model.config, "_attn_implementation", None)
        if attention != "flash_attention_2":
            log.info("--pack with attention %s: packed rows use a block-diagonal mask (no variable-length kernel); "
                     "--attn-implementation flash_attention_2 trains them without one", attention)

    def _load_teachers(self) -> tuple[Any, Any]:
        """--dense-teacher and --eval-teacher (default: the dense teacher), each
        loaded once, on this rank's device, before any step (hpd_tools/training/dense.py)."""
        from .dense import load_teacher

        config = self.config

        def load(name: str, flag: str) -> Any:
            return load_teacher(name, flag, self.tokenizer, dtype=self.dtype, device=self.device,
                                attn_implementation=config.attn_implementation, packed=config.pack and flag == "--dense-teacher")

        dense = load(config.dense_teacher, "--dense-teacher") if config.dense_teacher else None
        if not config.eval_cache:
            return dense, None
        if config.eval_teacher and config.eval_teacher != config.dense_teacher:
            return dense, load(config.eval_teacher, "--eval-teacher")
        return dense, dense

    def _make_onpolicy(self) -> Any:
        from ..onpolicy import OnPolicy

        config, world = self.config, self.world
        if not config.online_teacher.startswith(("http://", "https://")):  # a folder or a Hub id: its folder, resolved once
            from ..hub import local_model

            config = dataclasses.replace(config, online_teacher=local_model(config.online_teacher, None, "--online-teacher"))
        prompt_cache = config.prompt_cache or config.caches[0]
        store = check_caches([prompt_cache], self.tokenizer, what="--prompt-cache")[0]
        self.meta["cache_keys"]["prompt_cache"] = store.key
        onpolicy = OnPolicy(config, self.tokenizer, prompt_cache, k=self.k, max_length=int(store.attrs["max_length"]), rank=world.rank, world_size=world.world_size)
        if not config.online_teacher.startswith(("http://", "https://")):
            from transformers import AutoTokenizer

            try:
                theirs = tokenizer_hash(AutoTokenizer.from_pretrained(config.online_teacher))
            except Exception as exc:  # a folder without a tokenizer
                raise HPDError(f"--online-teacher {config.online_teacher}: its tokenizer does not load ({type(exc).__name__})") from None
            if theirs != store.attrs["tokenizer_hash"]:
                raise HPDError(f"--online-teacher {config.online_teacher}: tokenizer {theirs[:16]} differs from the cache's {store.attrs['tokenizer_hash'][:16]}; the online teacher must share the cache's tokenizer")
        return onpolicy

    def resume(self, ckpt: Path) -> None:
        """Continue from ``ckpt`` (its weights are already in the student):
        optimizer, schedule, every slot's stream position and noise, every rank's
        generators, the on-policy state and buffer; the loop starts after its step."""
        meta, world = self.saved, self.world
        states = torch.load(ckpt / "optimizer.pt", weights_only=False) if world.main else None
        load_optimizer(self.model, self.optimizer, states["optimizer"] if states else {}, world)
        self.scheduler.load_state_dict(world.broadcast(states["scheduler"] if states else None))
        self.stream.load_state({"slots": {j: st["stream"] for j, st in meta["slots"].items()}})
        restore_rng(self, ckpt, meta)
        if self.onpolicy is not None and "onpolicy" in meta:
            path = ckpt / f"onpolicy-rank{world.rank}.npz"
            self.onpolicy.load_state(meta["onpolicy"][world.rank], dict(np.load(path)) if path.exists() else None)
        self.step = int(meta["step"])
        log.info("resuming from %s (step %d)", ckpt, self.step)

    def start(self, marker: dict[str, Any] | None) -> None:
        """Before the first step: the stream's reader starts (the next step's
        micro-batches are read and decoded while this one trains); rank 0 marks
        --out as this run's (a new run at once; a resumed one once a step of it has
        trained, so a refused resume leaves the folder as it was) and opens
        metrics.jsonl, keeping the rows logged up to the checkpoint."""
        self.batches = Prefetcher(self.stream)
        if not self.world.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if marker is None:  # a new run (or one from before markers): marked before anything else is written
            self.meta["run_id"] = write_run_marker(self.out, None, self.config)["run_id"]
        else:
            self.meta["run_id"] = marker.get("run_id")
            self._marker = marker
        keep = int(self.saved["metrics_rows"]) if self.saved is not None else (0 if self.config.resume else None)
        self.metrics = Metrics(self.out, keep, self.config.report_to, run_id=self.meta["run_id"], config=dataclasses.asdict(self.config))

    # -- the loop's steps ----------------------------------------------------------

    def sample_round(self) -> dict[str, Any]:
        """One on-policy round (metrics averaged over ranks). Under FSDP2 the
        student's forwards are collectives: the root's parameters (embeddings,
        head) are gathered for the round, each block's by its own hooks, and
        every rank decodes in lockstep."""
        world = self.world
        if not (self.config.fsdp and world.distributed):
            result = self.onpolicy.round(self.model, self.device)
        else:
            self._init_fsdp_root()
            self.module.unshard()
            try:
                result = self.onpolicy.round(self.model, self.device, lockstep=world)
            finally:
                self.module.reshard()
        if world.distributed:
            keys = sorted(k for k, v in result.items() if isinstance(v, (int, float)))
            result = dict(zip(keys, (v / world.world_size for v in world.sum([float(result[k]) for k in keys]))))
        return result

    def _init_fsdp_root(self) -> None:
        """FSDP2 takes the first module to run forward as its root: run the root once
        (a 2-token batch) before the blocks run inside generate."""
        if self._root_ready:
            return
        k = self.k
        probe = collate([CachedSequence(0, 0, np.zeros(2, np.int64), np.array([True, False]), np.zeros(2, np.float32), np.zeros((2, k), np.int64), np.zeros((2, k), np.float32))], k)
        inputs, t = to_targets(probe, self.device)
        with torch.no_grad():
            self.module(inputs, torch.from_numpy(probe.loss_mask).to(self.device), t, evaluate=True)
        self._root_ready = True

    def train_step(self, step: int) -> StepResult:
        """One optimizer step: ``--grad-accum`` cached micro-batches (and the
        rollouts, weighted by ``--onpolicy-weight``), each forward + backward once;
        the loss summed over response tokens and divided once by the step's global
        count, so accumulation and ranks equal one big batch. A non-finite loss or
        gradient norm stops before the optimizer steps."""
        config, world = self.config, self.world
        batches = self.batches.next_batch()
        rollouts = self.onpolicy.next_batch(config.batch_tokens) if self.onpolicy is not None and config.onpolicy_weight > 0 else None
        n_active, n_on, missing = world.sum([
            sum(int(b.loss_mask.sum()) for b in batches),
            int(rollouts.loss_mask.sum()) if rollouts is not None else 0,
            0.0 if rollouts is not None else 1.0,
        ])
        if n_active == 0:
            raise HPDError(f"step {step + 1}: the batch has no response tokens; check the caches' loss masks")
        if missing > 0:  # some rank has none: the step goes without, on every rank
            rollouts = None
        w = config.onpolicy_weight if rollouts is not None else 0.0
        # DDP and FSDP2 average gradients over ranks; the scale makes that a sum,
        # divided once by the global count of response tokens.
        scale = world.world_size / n_active
        passes: list[tuple[Batch, torch.Generator, float]] = [(b, self.noise[j], (1.0 - w) * scale) for b, j in zip(batches, self.slots)]
        if rollouts is not None:
            passes.append((rollouts, self.rollout_noise, w * world.world_size / n_on))
        loss_local, on_local = 0.0, 0.0
        stats: dict[str, float] = {}
        sync = getattr(self.module, "no_sync", None)  # DDP: all-reduce once, after the last backward of the step
        for i, (batch, gen, batch_scale) in enumerate(passes):
            final_pass = i == len(passes) - 1
            if config.fsdp and world.distributed:
                self.module.set_requires_gradient_sync(final_pass)
            with sync() if sync is not None and not final_pass else contextlib.nullcontext():
                # The dense teacher replaces the caches' teacher arrays; rollouts keep the online teacher's scores.
                teacher = self.dense_teacher if batch is not rollouts else None
                loss_sum, batch_stats = micro_step(self.module, batch, gen, self.step_config, self.device, batch_scale, teacher=teacher)
            if batch is rollouts:
                on_local = loss_sum
                continue
            loss_local += loss_sum
            for name, value in batch_stats.items():
                stats[name] = stats.get(name, 0.0) + float(value)
        names = sorted(stats)
        loss_total, on_total, *stat_totals = world.sum([loss_local, on_local] + [stats[name] for name in names])
        loss = loss_total / n_active
        on_loss = None
        if rollouts is not None:
            on_loss = on_total / n_on
            loss = (1.0 - w) * loss + w * on_loss
        if not math.isfinite(loss):
            raise HPDError(f"step {step + 1}: loss is {loss} on the batch of sequences {_sequences(batches)}; the last good checkpoint is kept; lower --lr or check the cache with `hpd-tools verify`")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), config.max_grad_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if not math.isfinite(grad_norm):  # the same on every rank: the gradients are all-reduced before the norm
            raise HPDError(f"step {step + 1}: gradient norm is {grad_norm} (loss {loss:.6g}) on the batch of sequences {_sequences(batches)}; the optimizer did not step "
                           "and the last good checkpoint is kept; lower --lr, check the student's weights, or check the cache with `hpd-tools verify`")
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self._marker is not None and world.main:  # the first step of a resumed run has trained: the run is this one now
            write_run_marker(self.out, self._marker, config)
            self._marker = None
        self.window_tokens += sum(b.n_tokens for b in batches)
        self.step = step + 1
        return StepResult(loss, lr, grad_norm, int(n_active), dict(zip(names, stat_totals)), on_loss, w)

    def step_metrics(self, result: StepResult) -> dict[str, Any]:
        """The logged row of a step: loss, lr, gradient norm, tokens/s since the last
        row (all ranks), the loss's diagnostics per response token. A collective."""
        elapsed = time.time() - self.window_start
        tokens = self.world.sum([self.window_tokens])[0]
        row = {
            "loss": result.loss,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
            "response_tokens": result.response_tokens,
            **{f"{self.config.loss}/{k}": v / result.response_tokens for k, v in result.stats.items()},
        }
        if result.onpolicy_loss is not None:
            row.update({"onpolicy/loss": result.onpolicy_loss, "onpolicy/weight": result.onpolicy_weight})
        self.window_tokens, self.window_start = 0, time.time()
        return row

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.module, self.config.eval_cache, self.step_config, self.device, self.world, teacher=self.eval_teacher)

    def log(self, step: int, values: dict[str, Any]) -> dict[str, Any]:
        if self.metrics is not None:
            self.metrics.log(step, values)
        return values

    # -- outputs -------------------------------------------------------------------

    def save(self, step: int) -> Path:
        """step-XXXXXX/ (hpd_tools.training.checkpoint); every rank calls it."""
        return save_checkpoint(self, step)

    def save_final(self) -> None:
        """final/: the student alone, which ``AutoModelForCausalLM.from_pretrained`` loads."""
        config, world = self.config, self.world
        model_state, _ = full_state(self.model, None, world, fsdp=config.fsdp) if config.fsdp and world.distributed else (None, None)
        if world.main:
            final = self.out / "final"
            shutil.rmtree(final, ignore_errors=True)
            self.model.save_pretrained(final, state_dict=model_state)
            self.tokenizer.save_pretrained(final)
        world.barrier()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.batches is not None:
            self.batches.close()
        if self.onpolicy is not None:
            self.onpolicy.close()
