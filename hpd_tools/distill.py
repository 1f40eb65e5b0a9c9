"""``distill``: train a student from teacher caches with HPD or a baseline loss.

The loop, top to bottom (``train``):

1. check ``--out`` (absent, empty or an earlier run of distill, writable) and,
   on resume, that the checkpoint's options are this run's; then load the
   student and check its tokenizer against every cache's;
2. build the stream (caches mixed by weight), AdamW, warmup + cosine;
3. resume from the latest checkpoint when asked: weights, optimizer,
   scheduler, RNG and the stream's exact position;
4. each step: ``grad_accum`` micro-batches; the loss is summed over response
   tokens and divided once by the step's total count of response tokens, so
   accumulation equals one big batch; the student's [tokens, vocab] logits
   exist one chunk of ``loss_chunk_tokens`` at a time (recomputed in backward),
   so peak memory does not grow with batch-tokens x vocab;
5. clip, step, log metrics (JSON lines, TensorBoard when installed), eval and
   checkpoint at intervals (keeping the newest ``--keep-checkpoints``); a
   non-finite loss or gradient norm stops the run naming the step and the
   batch, before the optimizer steps, with the last good checkpoint kept;
6. save ``final/``, which ``AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import numbers
import os
import shutil
import time
import uuid
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from . import __version__
from .cache.layout import CacheStore, is_cache
from .cache.reader import Batch, CacheReader
from .errors import HPDError
from .hashing import tokenizer_hash
from .outputs import model_files, probe_writable
from .losses import LOSSES, SAMPLING_LOSSES, Targets, compute_loss, restrict_to_width, sample_from_logits
from .progress import Progress
from .parallel import World, full_state, init_world, load_optimizer, wrap
from .stream import Prefetcher, StepStream

log = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    """Everything ``hpd-tools distill`` takes (recipes/*.yaml map onto it)."""

    caches: list[str]
    student: str
    out: str
    cache_weights: list[float] = field(default_factory=list)
    loss: str = "hpd"
    loss_options: dict[str, Any] = field(default_factory=dict)
    max_steps: int = 100
    batch_tokens: int = 4096
    grad_accum: int = 1
    lr: float = 5e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 1.0
    dtype: str = "auto"  # auto (bfloat16 autocast on CUDA with bf16, else float32), float32 or bfloat16; the weights stay float32
    attn_implementation: str | None = None  # the student's attention (transformers' attn_implementation); None: transformers' default
    loss_chunk_tokens: int = 1024
    eval_cache: str | None = None
    eval_every: int = 0  # 0: eval once, at the end
    eval_batches: int = 0  # 0: the whole eval cache
    save_every: int = 0
    keep_checkpoints: int = 0  # the newest N complete step-* checkpoints are kept; 0: all
    log_every: int = 1
    seed: int = 0
    resume: bool = False
    # On-policy rounds (hpd_tools/onpolicy.py)
    online_teacher: str | None = None  # model folder (in-process) or http(s) URL of a vLLM server
    online_engine: str = "vllm"  # for a folder: vllm or hf
    online_engine_args: dict[str, Any] = field(default_factory=dict)
    sample_every: int = 0  # steps between rounds; 0: no on-policy rounds
    sample_prompts: int = 8
    sample_max_new_tokens: int = 64
    sample_temperature: float = 1.0
    onpolicy_weight: float = 0.5  # share of each step's loss that comes from rollouts
    onpolicy_buffer: int = 64  # rollouts kept and reused
    prompt_cache: str | None = None  # where prompts come from; default: the first --cache
    # Under torchrun (hpd_tools/parallel.py): shard the student with FSDP2 instead of replicating it (DDP)
    fsdp: bool = False
    # Pack sequences end to end in rows of pack_width tokens (default batch_tokens: one row) instead of padding them
    pack: bool = False
    pack_width: int = 0

    def validate(self) -> None:
        """Every option's type, range and combination; each error names the option
        as the command line spells it (recipes go through here too)."""
        if not self.caches:
            raise HPDError("--cache: give at least one cache")
        if self.loss not in LOSSES:
            raise HPDError(f"--loss {self.loss}: choose one of {', '.join(LOSSES)}")
        if self.cache_weights and len(self.cache_weights) != len(self.caches):
            raise HPDError(f"--cache-weight: {len(self.cache_weights)} weights for {len(self.caches)} caches; give one per --cache")
        for w in self.cache_weights:
            if not (_is_real(w) and math.isfinite(w) and w > 0):
                raise HPDError(f"--cache-weight {w}: weights must be positive finite numbers")
        for name, low in _INT_MINIMUMS.items():
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                why = " (one training position is a token and the next token it is trained to predict)" if name == "batch_tokens" else ""
                raise HPDError(f"{_flag(name)} {value}: must be an integer of at least {low}{why}")
        if self.seed >= 2**63:
            raise HPDError(f"--seed {self.seed}: must be below 2**63")
        for name, low, high, low_open, high_open in _REAL_RANGES:
            value = getattr(self, name)
            if not (_is_real(value) and math.isfinite(value)) or value < low or (low_open and value == low) or value > high or (high_open and value == high):
                if math.isfinite(high):
                    span = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
                else:
                    span = "a positive finite number" if low_open else f"a finite number of at least {low:g}"
                raise HPDError(f"{_flag(name)} {value}: must be {span}")
        if len(self.betas) != 2 or not all(_is_real(b) and 0.0 <= b < 1.0 for b in self.betas):
            raise HPDError(f"--betas {' '.join(map(str, self.betas))}: give two numbers in [0, 1)")
        if self.dtype not in DTYPES:
            raise HPDError(f"--dtype {self.dtype}: choose {', '.join(DTYPES)}")
        if self.attn_implementation is not None and not (isinstance(self.attn_implementation, str) and self.attn_implementation.strip()):
            raise HPDError(f"--attn-implementation {self.attn_implementation!r}: give an implementation transformers knows (sdpa, eager, flash_attention_2, ...)")
        if self.eval_every and not self.eval_cache:
            raise HPDError("--eval-every needs --eval-cache")
        if self.sample_every and not self.online_teacher:
            raise HPDError("--sample-every needs --online-teacher")
        if self.online_teacher and not self.sample_every:
            raise HPDError("--online-teacher needs --sample-every N (steps between on-policy rounds)")
        if self.online_engine not in ("vllm", "hf"):
            raise HPDError(f"--online-engine {self.online_engine}: choose vllm or hf")
        if self.online_teacher and self.online_engine_args:
            from .engines import check_engine_args

            if self.online_teacher.startswith(("http://", "https://")):
                check_engine_args("server", self.online_engine_args, where="online_engine_args", reserved={"url": "--online-teacher"})
            else:
                check_engine_args(self.online_engine, self.online_engine_args, where="online_engine_args", reserved={"model": "--online-teacher"})
        if self.pack_width and not self.pack:
            raise HPDError(f"--pack-width {self.pack_width}: give a positive width, with --pack")
        if self.warmup_steps > self.max_steps:
            raise HPDError(f"--warmup-steps {self.warmup_steps}: must be between 0 and --max-steps {self.max_steps}")
        check_loss_options(self.loss, self.loss_options)


# Integer options and their smallest value. --batch-tokens: a sequence longer
# than the budget is a batch of its own, so any budget trains; 2 is the smallest
# that can hold one training position.
_INT_MINIMUMS = {
    "max_steps": 1, "batch_tokens": 2, "grad_accum": 1, "loss_chunk_tokens": 1, "log_every": 1, "seed": 0,
    "warmup_steps": 0, "save_every": 0, "keep_checkpoints": 0, "eval_every": 0, "eval_batches": 0, "pack_width": 0,
    "sample_every": 0, "sample_prompts": 1, "sample_max_new_tokens": 1, "onpolicy_buffer": 1,
}
DTYPES = ("auto", "float32", "bfloat16")
# Real options: (name, low, high, low excluded, high excluded).
_REAL_RANGES = [
    ("lr", 0.0, math.inf, True, False),
    ("min_lr_ratio", 0.0, 1.0, False, False),
    ("weight_decay", 0.0, math.inf, False, False),
    ("max_grad_norm", 0.0, math.inf, True, False),
    ("sample_temperature", 0.0, math.inf, True, False),
    ("onpolicy_weight", 0.0, 1.0, False, False),
]


def _flag(name: str) -> str:
    """A DistillConfig field as the command line spells it."""
    return {"caches": "--cache", "cache_weights": "--cache-weight", "loss_options": "--loss-option"}.get(name, "--" + name.replace("_", "-"))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_loss_options(loss: str, options: dict[str, Any]) -> None:
    """Each ``--loss-option`` a keyword of the loss, with a value it takes.

    The losses check their option values when they run; running the loss once
    on a one-position input here makes a bad value an error before any model is
    loaded, not at step 1."""
    fn = LOSSES[loss]
    params = {name: p for name, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}
    for key, value in options.items():
        if key not in params:
            raise HPDError(f"--loss-option {key}: --loss {loss} has no such option; its options: {', '.join(params) or 'none'}")
        if isinstance(params[key].default, float) and not (_is_real(value) and math.isfinite(value)):
            raise HPDError(f"--loss-option {key}={value}: expected a finite number")
        probe = Targets(labels=torch.tensor([1]), mask=torch.tensor([True]), label_logprob=torch.tensor([-1.0]), topk_ids=torch.tensor([[1, 2]]),
                        topk_logprobs=torch.tensor([[-1.0, -2.0]]), noise=torch.tensor([0.5]))
        try:
            with torch.no_grad():
                compute_loss(loss, torch.zeros(1, 4), probe, **{key: value})
        except HPDError as exc:
            raise HPDError(f"--loss-option {key}={value}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise HPDError(f"--loss-option {key}={value}: not a value --loss {loss} takes ({exc})") from None


# -- pieces the loop uses --------------------------------------------------------

def lr_factor(step: int, config: DistillConfig, horizon: int | None = None) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``horizon``
    (default ``max_steps``; a resumed run keeps the one it started with), flat after it."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max((horizon or config.max_steps) - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``--dtype`` as a run on ``device`` computes: "auto" is bfloat16 on a CUDA
    device with native bf16, float32 elsewhere (a CPU has no fast bf16 path)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False) else "float32"


def autocast(dtype: str, device: torch.device) -> Any:
    """The student's forward passes at ``--dtype``: bfloat16 autocast over the
    float32 weights (the master copy the optimizer updates), or plain float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve_dtype(dtype, device) == "bfloat16")


def set_matmul_precision(dtype: str, device: torch.device) -> None:
    """float32 on CUDA: allow TF32 matmuls (torch's default is full fp32, several times slower)."""
    if device.type == "cuda" and dtype == "float32":
        torch.set_float32_matmul_precision("high")


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def load_student(path: str, attn_implementation: str | None = None) -> tuple[Any, Any]:
    """The student (float32 weights) and its tokenizer; ``attn_implementation``
    goes to transformers (None: its default)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not Path(path).is_dir():
        raise HPDError(f"--student {path}: no such folder; give a Hugging Face model folder")
    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model_config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # transformers raises many types for a broken folder
        raise HPDError(f"--student {path}: does not load as a causal LM ({_first_line(exc)})") from None
    if attn:
        # Built on the meta device (no memory, no weights read), so that a refusal
        # is told apart from a broken folder.
        try:
            with torch.device("meta"):
                AutoModelForCausalLM.from_config(model_config, **attn)
        except Exception as exc:  # ImportError (a missing package), ValueError (an unknown name), ...
            raise HPDError(f"--attn-implementation {attn_implementation}: transformers refuses it for --student {path} ({_first_line(exc, 160)}); "
                           "choose sdpa or eager, or install what it names") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **attn)
    except Exception as exc:
        raise HPDError(f"--student {path}: does not load as a causal LM ({_first_line(exc)})") from None
    return model, tokenizer


def check_caches(paths: list[str], tokenizer: Any, what: str = "--cache") -> list[CacheStore]:
    """Every cache complete and made with the student's tokenizer."""
    student_hash = tokenizer_hash(tokenizer)
    stores = []
    for path in paths:
        store = CacheStore(path)
        if not store.complete:
            raise HPDError(f"{what} {path}: cache is incomplete ({len(store.done_units())}/{store.n_units} units); finish it by rerunning its `hpd-tools cache` command")
        if store.attrs["tokenizer_hash"] != student_hash:
            raise HPDError(
                f"{what} {path}: made with tokenizer {store.attrs['tokenizer_hash'][:16]}, the student's is {student_hash[:16]}; "
                "the student must share the teacher's tokenizer"
            )
        store.check_chunk_files()  # a deleted or truncated chunk stops the run before it trains, not when the stream reaches it
        stores.append(store)
    ks = {s.k for s in stores}
    if len(ks) > 1:
        raise HPDError(f"--cache: caches have different top-k ({sorted(ks)}); mix caches with one k")
    return stores


def to_targets(batch: Batch, device: torch.device) -> tuple[dict[str, Any], Targets]:
    """The student's inputs and the flat targets of the trained positions.

    Position i is trained on token i+1 (the cache's convention), so hidden
    state [b, i] meets labels[b, i] = input_ids[b, i+1]. A padded batch gets an
    attention mask; a packed one position ids restarting at each sequence and no
    mask, from which transformers builds the block-diagonal causal mask (each
    sequence attends to itself only).
    """
    ids = torch.from_numpy(batch.input_ids).to(device)
    inputs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
    if batch.position_ids is not None:
        inputs["position_ids"] = torch.from_numpy(batch.position_ids).to(device)
    else:
        attn = torch.zeros_like(ids)
        for i, n in enumerate(batch.lengths):
            attn[i, :n] = 1
        inputs["attention_mask"] = attn
    mask = torch.from_numpy(batch.loss_mask).to(device)
    labels = torch.zeros_like(ids)
    labels[:, :-1] = ids[:, 1:]
    targets = Targets(
        labels=labels[mask],
        mask=torch.ones(int(mask.sum()), dtype=torch.bool, device=device),
        label_logprob=torch.from_numpy(batch.label_logprob).to(device)[mask],
        topk_ids=torch.from_numpy(batch.topk_ids).to(device)[mask],
        topk_logprobs=torch.from_numpy(batch.topk_logprobs).to(device)[mask],
        noise=torch.zeros(int(mask.sum()), device=device),
    )
    return inputs, targets


@torch.no_grad()
def packing_works(model: Any) -> bool:
    """Whether the student keeps packed sequences apart: two short sequences,
    run packed and one by one, give the same hidden states. Models whose
    attention ignores position-id boundaries would mix them."""
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, vocab, (1, 5), generator=gen), torch.randint(3, vocab, (1, 7), generator=gen)
    device = next(model.parameters()).device
    base = model.base_model
    was_training = model.training
    model.eval()
    try:
        apart = torch.cat([base(input_ids=x.to(device), use_cache=False).last_hidden_state for x in (a, b)], dim=1)
        pos = torch.cat([torch.arange(5), torch.arange(7)])[None].to(device)
        together = base(input_ids=torch.cat([a, b], dim=1).to(device), position_ids=pos, use_cache=False).last_hidden_state
    except Exception:  # a model that does not take position ids
        return False
    finally:
        model.train(was_training)
    return bool(torch.allclose(apart.float(), together.float(), atol=1e-4, rtol=1e-4))


def _slice(t: Targets, a: int, b: int) -> Targets:
    return Targets(**{f.name: None if getattr(t, f.name) is None else getattr(t, f.name)[a:b] for f in fields(Targets)})


def chunked_loss(model: Any, hidden: torch.Tensor, targets: Targets, config: DistillConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of the per-token loss over ``hidden``'s rows, one chunk of rows at a time.

    Each chunk's logits are built, used and freed inside a checkpointed call, so
    backward recomputes them chunk by chunk instead of keeping [rows, vocab].
    A loss that samples y' (hpd, rkl) draws it once, from the forward pass's
    logits, and the recomputation reuses that draw (T longs per chunk): its
    logits need not be bit-identical on a GPU, and a resampled y' near a CDF
    boundary would train another token than the one the weight was computed
    for. Backward then skips the sampler's softmax and cumsum, too.
    """
    head = model.get_output_embeddings()
    samples = config.loss in SAMPLING_LOSSES

    def run(h: torch.Tensor, t: Targets, drawn: list[torch.Tensor]) -> Any:
        logits = head(h)
        if samples:
            if not drawn:  # the forward pass; the recomputation finds the draw here
                drawn.append(sample_from_logits(logits, t.noise))
            t = dataclasses.replace(t, sampled=drawn[0])
        return compute_loss(config.loss, logits, t, **config.loss_options)

    total = hidden.new_zeros((), dtype=torch.float32)
    stats: dict[str, torch.Tensor] = {}
    for a in range(0, hidden.shape[0], config.loss_chunk_tokens):
        b = min(a + config.loss_chunk_tokens, hidden.shape[0])
        part = _slice(targets, a, b)
        drawn: list[torch.Tensor] = [part.sampled] if part.sampled is not None else []
        out = checkpoint(run, hidden[a:b], part, drawn, use_reentrant=False) if torch.is_grad_enabled() else run(hidden[a:b], part, drawn)
        total = total + out.loss_sum.float()
        for name, value in out.stats.items():
            stats[name] = stats.get(name, 0) + value.detach().double()
    return total, stats


# -- the student as one module ------------------------------------------------------

class StudentLoss(torch.nn.Module):
    """The student's forward pass and chunked loss for one micro-batch, as one
    module, so DDP and FSDP2 see a single forward (and backward) per micro-batch.
    ``evaluate=True`` returns the eval sums instead (see :func:`evaluate`)."""

    def __init__(self, model: Any, config: DistillConfig):
        super().__init__()
        self.model = model
        self.config = config

    def forward(self, inputs: dict[str, Any], mask: torch.Tensor, targets: Targets, evaluate: bool = False) -> Any:
        hidden = self.model.base_model(**inputs).last_hidden_state[mask]
        if not evaluate:
            return chunked_loss(self.model, hidden, targets, self.config)
        head, c = self.model.get_output_embeddings(), self.config.loss_chunk_tokens
        sums = torch.zeros(5, dtype=torch.float64, device=hidden.device)
        for a in range(0, hidden.shape[0], c):
            b = min(a + c, hidden.shape[0])
            ls = torch.log_softmax(head(hidden[a:b]).float(), dim=-1)
            # Teacher ids past the student's width drop out of the top-k (hpd_tools.losses, "Widths").
            ids, lt, dropped = restrict_to_width(targets.topk_ids[a:b], targets.topk_logprobs[a:b], ls.shape[-1])
            p = lt.exp()
            sums[0] += (p * torch.where(p > 0, lt - ls.gather(-1, ids), 0.0)).sum().double()
            sums[1] -= ls.gather(-1, targets.labels[a:b, None]).sum().double()
            sums[2] -= targets.label_logprob[a:b].sum().double()
            sums[4] += dropped.sum().double()
        sums[3] = hidden.shape[0]
        return sums


def _as_step_module(model: Any, config: DistillConfig) -> Any:
    return StudentLoss(model, config) if hasattr(model, "get_output_embeddings") else model


# -- checkpoints -------------------------------------------------------------------

def _checkpoints(out: Path) -> list[Path]:
    """The step-N folders in ``out``, oldest first (by N: step-1000000 follows step-999999)."""
    found = [p for p in out.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


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
    complete = [p for p in _checkpoints(out) if (p / "meta.json").is_file()]
    deleted = []
    for old in complete[:-keep]:
        doomed = out / f".deleting-{old.name}"
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        deleted.append(old)
    return deleted


def save_checkpoint(out: Path, step: int, model: Any, tokenizer: Any, optimizer: Any, scheduler: Any, stream: StepStream | Prefetcher, noise: dict[int, torch.Generator], config: DistillConfig, onpolicy: Any = None, world: World | None = None, metrics_rows: int = 0, rollout_noise: torch.Generator | None = None, run_meta: dict[str, Any] | None = None) -> Path:
    """step-XXXXXX/: the student (HF format), optimizer (keyed by parameter name)
    + scheduler, and meta.json (config, step, every data slot's stream position
    and RNG, every rank's torch, CUDA and rollout RNG, ``run_meta``: the caches' keys,
    the schedule's horizon, the resolved dtype). Rank 0 writes it under .tmp and
    renames, then keeps the newest ``--keep-checkpoints``; a collective under
    torchrun (every rank calls it)."""
    world = world or World()
    model_state, optim_state = full_state(model, optimizer, world, fsdp=config.fsdp)
    slots: dict[str, Any] = {}
    for part in world.gather({"stream": stream.state()["slots"], "noise": {str(j): g.get_state().tolist() for j, g in noise.items()}}):
        for j, st in part["stream"].items():
            slots.setdefault(j, {})["stream"] = st
        for j, st in part["noise"].items():
            slots[j]["noise_rng"] = st
    onpolicy_parts = world.gather((onpolicy.state(), onpolicy.buffer_arrays())) if onpolicy is not None else None
    ranks = world.gather({"torch_rng": torch.get_rng_state().tolist(), "cuda_rng": _cuda_rng(),
                          "rollout_rng": rollout_noise.get_state().tolist() if rollout_noise is not None else None})
    final = out / f"step-{step:06d}"
    if world.main:
        tmp = out / f"step-{step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp / "model", state_dict=model_state)
        tokenizer.save_pretrained(tmp / "model")
        torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        meta = {
            "step": step,
            "config": asdict(config),
            "world_size": world.world_size,
            "n_slots": world.world_size * config.grad_accum,
            "slots": slots,
            "ranks": ranks,
            "metrics_rows": metrics_rows,
            **(run_meta or {}),
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


# -- eval ------------------------------------------------------------------------------

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
    step_module = _as_step_module(model, config)
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


# -- the loop --------------------------------------------------------------------------

class _Metrics:
    def __init__(self, out: Path, keep_rows: int | None):
        self.path = out / "metrics.jsonl"
        self.rows = 0
        if keep_rows is not None and self.path.exists():
            # Drop what was logged after the checkpoint we resume from.
            kept = [line for line in self.path.read_text().splitlines() if line][:keep_rows]
            self.path.write_text("".join(line + "\n" for line in kept))
            self.rows = len(kept)
        self.file = self.path.open("a")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def log(self, step: int, values: dict[str, Any]) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        self.rows += 1
        if self.tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def micro_step(model: Any, batch: Batch, noise_gen: torch.Generator, config: DistillConfig, device: torch.device, scale: float) -> tuple[float, dict[str, torch.Tensor]]:
    """Forward + backward of one micro-batch, its loss scaled by ``scale`` (1 / the
    step's response tokens). ``model`` is the student, or its StudentLoss under
    DDP/FSDP2. Returns the unscaled loss sum and diagnostic sums."""
    step_module = _as_step_module(model, config)
    inputs, targets = to_targets(batch, device)
    targets.noise = torch.rand(targets.labels.shape[0], generator=noise_gen).to(device)
    with autocast(config.dtype, device):
        loss_sum, stats = step_module(inputs, torch.from_numpy(batch.loss_mask).to(device), targets)
    (loss_sum * scale).backward()
    return float(loss_sum.detach()), stats


def _sequences(batches: list[Batch]) -> str:
    """The step's sequence indices, as an error message shows them."""
    seqs = [int(i) for b in batches for i in b.indices]
    return f"{seqs[:8]}{'...' if len(seqs) > 8 else ''}"


def _noise_generator(seed: int, stream: int) -> torch.Generator:
    """The HPD sampler's noise for one data slot (``stream`` >= 0) or one rank's rollouts (< 0)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, stream + (1 << 20)]).generate_state(1)[0]))


# -- the run folder ----------------------------------------------------------------
#
# --out is absent, empty, or a run that distill itself made: a folder with its
# marker, hpd-run.json (format, version, the run's id and its latest config).
# Anything else (a model, a cache, a folder of other files, an input's folder)
# is refused before anything is loaded or written.

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
    return (out / "metrics.jsonl").is_file() or bool(_checkpoints(out))


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


def _write_run_marker(out: Path, previous: dict[str, Any] | None, config: DistillConfig) -> dict[str, Any]:
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
# other DistillConfig field must equal the checkpoint's (README: distill, Resume).
RESUME_MAY_CHANGE = {
    "max_steps": "where the run stops; the learning-rate schedule keeps the horizon the run started with",
    "eval_cache": "evaluation only",
    "eval_every": "evaluation only",
    "eval_batches": "evaluation only",
    "save_every": "checkpoints only",
    "log_every": "logging only",
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
    shown = {} if "loss" in changed else {"loss_options": (a["loss_options"], b["loss_options"])}
    before = " ".join(_show(n, shown[n][0] if n in shown else saved[n]) for n in changed)
    after = " ".join(_show(n, shown[n][1] if n in shown else mine[n]) for n in changed)
    if before == after:  # the same paths, other caches there now
        after += " (other caches at those paths)"
    may = ", ".join(_flag(n) for n in RESUME_MAY_CHANGE if n not in ("out", "resume", "student", "online_engine_args"))
    raise HPDError(f"--resume {ckpt}: the checkpoint was trained with {before}, this run asks for {after}; "
                   f"resume with the checkpoint's options or start a new run in another --out (a resumed run may change only {may})")


def _read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
        int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HPDError(f"--resume {ckpt}: its meta.json is unreadable ({type(exc).__name__}: {exc}); remove that checkpoint folder to resume from the one before") from None
    return meta


def _find_resume(out: Path, config: DistillConfig, world: World) -> Path | None:
    """Rank 0's view of --out: the checkpoint to resume from (checked against this
    run's options), or an HPDError saying why the run may not start."""
    existing = _checkpoints(out) if out.exists() else []
    if config.resume and existing:
        ckpt = existing[-1]
        meta = _read_meta(ckpt)
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


def _prepare_out(config: DistillConfig, world: World) -> tuple[Path | None, dict[str, Any] | None, str | None]:
    """Rank 0: the guards on --out, then the checkpoint to resume from. A problem is
    returned, not raised, so that every rank learns it."""
    try:
        marker = check_out(config)
        return _find_resume(Path(config.out), config, world), marker, None
    except HPDError as exc:
        return None, None, str(exc)


def _check_widths(config: DistillConfig, model: Any, tokenizer: Any, stores: list[CacheStore]) -> None:
    """A student narrower than its tokenizer cannot embed every token: refuse it. A
    teacher wider than the student is the seed paper's own pair (Qwen2.5-7B, 152,064
    rows, over Qwen2.5-1.5B, 151,936): say what happens to the ids past the student."""
    rows = int(model.get_input_embeddings().num_embeddings)
    width = int(getattr(model.get_output_embeddings(), "out_features", rows))
    if min(rows, width) < len(tokenizer):
        raise HPDError(f"--student {config.student}: its embedding has {min(rows, width)} rows, fewer than its tokenizer's {len(tokenizer)} tokens; "
                       "resize the student's embeddings (model.resize_token_embeddings) before distilling")
    teacher = max(int((s.attrs.get("teacher") or {}).get("vocab_size") or 0) for s in stores)
    if teacher > width:
        log.info("teacher width %d > student width %d (one tokenizer of %d tokens): top-k ids >= %d drop out and their mass joins the tail; "
                 "metrics.jsonl logs it as %s/dropped_mass", teacher, width, len(tokenizer), width, config.loss)


def _round(onpolicy: Any, module: Any, model: Any, config: DistillConfig, world: World, device: torch.device) -> dict[str, Any]:
    """One on-policy round. Under FSDP2 the student's forwards are collectives:
    the root's parameters (embeddings, head) are gathered for the round, each
    block's by its own hooks, and every rank decodes in lockstep."""
    if not (config.fsdp and world.distributed):
        return onpolicy.round(model, device)
    if not getattr(module, "_hpd_initialised", False):
        # FSDP2 takes the first module to run forward as its root: run the root once
        # (a 2-token batch) before the blocks run inside generate.
        from .cache.reader import CachedSequence, collate

        k = onpolicy.k
        probe = collate([CachedSequence(0, 0, np.zeros(2, np.int64), np.array([True, False]), np.zeros(2, np.float32), np.zeros((2, k), np.int64), np.zeros((2, k), np.float32))], k)
        inputs, t = to_targets(probe, device)
        with torch.no_grad():
            module(inputs, torch.from_numpy(probe.loss_mask).to(device), t, evaluate=True)
        module._hpd_initialised = True
    module.unshard()
    try:
        return onpolicy.round(model, device, lockstep=world)
    finally:
        module.reshard()


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
    out = Path(config.out)
    # Rank 0 checks --out and decides whether and where to resume; every rank learns the outcome.
    ckpt, marker, problem = _prepare_out(config, world) if world.main else (None, None, None)
    ckpt, problem = world.broadcast((ckpt, problem))
    if problem:
        raise HPDError(problem)
    torch.manual_seed(config.seed + world.rank)  # on-policy sampling: each rank its own draws
    device = world.device
    dtype = resolve_dtype(config.dtype, device)  # once: the loop, evaluation and checkpoints use the resolved value
    set_matmul_precision(dtype, device)
    log.info("precision: %s on %s%s", "bfloat16 autocast, float32 weights" if dtype == "bfloat16" else "float32",
             device, " (TF32 matmuls)" if device.type == "cuda" and dtype == "float32" else "")
    step_config = dataclasses.replace(config, dtype=dtype)
    model, tokenizer = load_student(config.student, config.attn_implementation)
    stores = check_caches(config.caches, tokenizer)
    if config.eval_cache:
        check_caches([config.eval_cache], tokenizer, what="--eval-cache")
    head = model.get_output_embeddings()
    if head is None or not hasattr(model, "base_model"):
        raise HPDError(f"--student {config.student}: no output embedding (LM head) to distill into")
    _check_widths(config, model, tokenizer, stores)

    n_slots = world.world_size * config.grad_accum
    my_slots = list(range(world.rank * config.grad_accum, (world.rank + 1) * config.grad_accum))
    if config.pack and not packing_works(model):
        raise HPDError(f"--pack: the student {config.student} ({type(model).__name__}) mixes packed sequences (its attention does not follow position-id boundaries); train without --pack")
    attention = getattr(model.config, "_attn_implementation", None)
    if config.pack and attention != "flash_attention_2":
        log.info("--pack with attention %s: packed rows use a block-diagonal mask (no variable-length kernel); "
                 "--attn-implementation flash_attention_2 trains them without one", attention)
    stream = StepStream(config.caches, slots=my_slots, n_slots=n_slots, weights=config.cache_weights or None, batch_tokens=config.batch_tokens, seed=config.seed, packed=config.pack, pack_width=config.pack_width or None)
    noise = {j: _noise_generator(config.seed, j) for j in my_slots}
    rollout_noise = _noise_generator(config.seed, -1 - world.rank)
    onpolicy = None
    # What every checkpoint records about the run besides its config: the caches'
    # identity (a moved cache keeps its key) and the schedule's horizon.
    run_meta: dict[str, Any] = {"cache_keys": {"caches": [s.key for s in stores], "prompt_cache": None}, "dtype": dtype}
    if config.sample_every:
        from .onpolicy import OnPolicy

        prompt_cache = config.prompt_cache or config.caches[0]
        store = check_caches([prompt_cache], tokenizer, what="--prompt-cache")[0]
        run_meta["cache_keys"]["prompt_cache"] = store.key
        onpolicy = OnPolicy(config, tokenizer, prompt_cache, k=stream.k, max_length=int(store.attrs["max_length"]), rank=world.rank, world_size=world.world_size)
        if not config.online_teacher.startswith(("http://", "https://")):
            from transformers import AutoTokenizer

            try:
                theirs = tokenizer_hash(AutoTokenizer.from_pretrained(config.online_teacher))
            except Exception as exc:  # a folder without a tokenizer
                raise HPDError(f"--online-teacher {config.online_teacher}: its tokenizer does not load ({type(exc).__name__})") from None
            if theirs != store.attrs["tokenizer_hash"]:
                raise HPDError(f"--online-teacher {config.online_teacher}: tokenizer {theirs[:16]} differs from the cache's {store.attrs['tokenizer_hash'][:16]}; the online teacher must share the cache's tokenizer")

    meta = json.loads((ckpt / "meta.json").read_text()) if ckpt is not None and world.main else None
    meta = world.broadcast(meta)
    if ckpt is not None and world.main:
        from transformers import AutoModelForCausalLM

        try:
            model.load_state_dict(AutoModelForCausalLM.from_pretrained(ckpt / "model", dtype=torch.float32).state_dict())
        except RuntimeError as exc:  # another architecture
            raise HPDError(f"--resume {ckpt}: its weights do not fit --student {config.student} ({str(exc).splitlines()[0]}); resume with the student the run started from") from None
    model.to(device).train()
    if ckpt is not None and world.distributed:  # ranks other than 0 take rank 0's weights
        for tensor in model.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
    module = wrap(StudentLoss(model, step_config), model, world, fsdp=config.fsdp, dtype=dtype)
    optimizer = torch.optim.AdamW(module.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    # The schedule's horizon is the run's first --max-steps: a resumed run that
    # stops later or earlier follows the same learning rates (flat after it).
    horizon = int(meta.get("schedule_steps") or meta["config"]["max_steps"]) if meta is not None else config.max_steps
    run_meta["schedule_steps"] = horizon
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config, horizon))

    start_step = 0
    if ckpt is not None:
        states = torch.load(ckpt / "optimizer.pt", weights_only=False) if world.main else None
        load_optimizer(model, optimizer, states["optimizer"] if states else {}, world)
        scheduler.load_state_dict(world.broadcast(states["scheduler"] if states else None))
        stream.load_state({"slots": {j: st["stream"] for j, st in meta["slots"].items()}})
        for j, gen in noise.items():
            gen.set_state(torch.tensor(meta["slots"][str(j)]["noise_rng"], dtype=torch.uint8))
        mine = meta["ranks"][world.rank] if meta["world_size"] == world.world_size else meta["ranks"][0]
        torch.set_rng_state(torch.tensor(mine["torch_rng"], dtype=torch.uint8))
        _restore_cuda_rng(mine.get("cuda_rng"), ckpt)
        if mine["rollout_rng"] is not None:
            rollout_noise.set_state(torch.tensor(mine["rollout_rng"], dtype=torch.uint8))
        start_step = int(meta["step"])
        if onpolicy is not None and "onpolicy" in meta:
            path = ckpt / f"onpolicy-rank{world.rank}.npz"
            arrays = dict(np.load(path)) if path.exists() else None
            onpolicy.load_state(meta["onpolicy"][world.rank], arrays)
        log.info("resuming from %s (step %d)", ckpt, start_step)
    metrics = None
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        if marker is None:  # a new run (or one from before markers): marked before anything else is written
            run_meta["run_id"] = _write_run_marker(out, marker, config)["run_id"]
        else:  # a resumed run: its marker is updated once a step of this run has trained, not by a run refused on the way
            run_meta["run_id"] = marker.get("run_id")
        # On resume, keep the rows logged up to the checkpoint (none when there is no checkpoint yet).
        metrics = _Metrics(out, int(meta["metrics_rows"]) if meta is not None else (0 if config.resume else None))
    # The next step's micro-batches are read and decoded while this one trains.
    batches_in = Prefetcher(stream)

    progress = Progress(total=config.max_steps, unit="steps", desc=f"distill {config.loss}") if world.main else None
    if progress is not None:
        progress.update(start_step, count_rate=False)
    last: dict[str, Any] = {}
    step_metrics: dict[str, Any] = {}
    latest_round: dict[str, Any] = {}
    latest_eval: dict[str, Any] = {}
    window_tokens, window_start = 0, time.time()
    sync = getattr(module, "no_sync", None)  # DDP: all-reduce once, after the last backward of the step
    try:
        for step in range(start_step, config.max_steps):
            if onpolicy is not None and step % config.sample_every == 0:
                latest_round = _round(onpolicy, module, model, config, world, device)
                if world.distributed:
                    keys = sorted(k for k, v in latest_round.items() if isinstance(v, (int, float)))
                    latest_round = dict(zip(keys, (v / world.world_size for v in world.sum([float(latest_round[k]) for k in keys]))))
                if metrics is not None:
                    metrics.log(step, latest_round)
            batches = batches_in.next_batch()
            rollouts = onpolicy.next_batch(config.batch_tokens) if onpolicy is not None and config.onpolicy_weight > 0 else None
            n_active, n_on, have_rollouts = world.sum([
                sum(int(b.loss_mask.sum()) for b in batches),
                int(rollouts.loss_mask.sum()) if rollouts is not None else 0,
                0.0 if rollouts is not None else 1.0,
            ])
            if n_active == 0:
                raise HPDError(f"step {step + 1}: the batch has no response tokens; check the caches' loss masks")
            if have_rollouts > 0:  # some rank has none: the step goes without, on every rank
                rollouts = None
            w = config.onpolicy_weight if rollouts is not None else 0.0
            # DDP and FSDP2 average gradients over ranks; the scale makes that a sum,
            # divided once by the global count of response tokens.
            scale = world.world_size / n_active
            loss_local = 0.0
            stats: dict[str, float] = {}
            passes: list[tuple[Batch, torch.Generator, float]] = [(b, noise[j], (1.0 - w) * scale) for b, j in zip(batches, my_slots)]
            if rollouts is not None:
                passes.append((rollouts, rollout_noise, w * world.world_size / n_on))
            on_local = 0.0
            for i, (batch, gen, batch_scale) in enumerate(passes):
                final_pass = i == len(passes) - 1
                if config.fsdp and world.distributed:
                    module.set_requires_gradient_sync(final_pass)
                context = sync() if sync is not None and not final_pass else contextlib.nullcontext()
                with context:
                    loss_sum, batch_stats = micro_step(module, batch, gen, step_config, device, batch_scale)
                if batch is rollouts:
                    on_local = loss_sum
                    continue
                loss_local += loss_sum
                for name, value in batch_stats.items():
                    stats[name] = stats.get(name, 0.0) + float(value)
            names = sorted(stats)
            loss_total, on_total, *stat_totals = world.sum([loss_local, on_local] + [stats[name] for name in names])
            stats = dict(zip(names, stat_totals))
            loss = loss_total / n_active
            on_loss = None
            if rollouts is not None:
                on_loss = on_total / n_on
                loss = (1.0 - w) * loss + w * on_loss
            if not math.isfinite(loss):
                raise HPDError(f"step {step + 1}: loss is {loss} on the batch of sequences {_sequences(batches)}; the last good checkpoint is kept; lower --lr or check the cache with `hpd-tools verify`")
            grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), config.max_grad_norm)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if not math.isfinite(grad_norm):  # the same on every rank: the gradients are all-reduced before the norm
                raise HPDError(f"step {step + 1}: gradient norm is {grad_norm} (loss {loss:.6g}) on the batch of sequences {_sequences(batches)}; the optimizer did not step "
                               "and the last good checkpoint is kept; lower --lr, check the student's weights, or check the cache with `hpd-tools verify`")
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if marker is not None and world.main and step == start_step:
                _write_run_marker(out, marker, config)
            window_tokens += sum(b.n_tokens for b in batches)
            done = step + 1
            if done % config.log_every == 0 or done == config.max_steps:
                elapsed = time.time() - window_start
                window_tokens = world.sum([window_tokens])[0]
                step_metrics = {
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": window_tokens / elapsed if elapsed > 0 else None,
                    "response_tokens": int(n_active),
                    **{f"{config.loss}/{k}": v / n_active for k, v in stats.items()},
                }
                if on_loss is not None:
                    step_metrics.update({"onpolicy/loss": on_loss, "onpolicy/weight": w})
                window_tokens, window_start = 0, time.time()
                if metrics is not None:
                    metrics.log(done, step_metrics)
            if config.eval_cache and ((config.eval_every and done % config.eval_every == 0) or done == config.max_steps):
                latest_eval = evaluate(module, config.eval_cache, step_config, device, world)
                if metrics is not None:
                    metrics.log(done, latest_eval)
            if config.save_every and done % config.save_every == 0 and done < config.max_steps:
                save_checkpoint(out, done, model, tokenizer, optimizer, scheduler, batches_in, noise, config, onpolicy, world, metrics.rows if metrics else 0, rollout_noise, run_meta)
            last = {**step_metrics, **latest_round, **latest_eval}
            if progress is not None:
                rate = f" {last['tokens_per_s']:,.0f} tok/s" if last.get("tokens_per_s") else ""
                rkl = f" on-policy rkl {last['onpolicy/rkl']:.3f}" if "onpolicy/rkl" in last else ""
                progress.desc = f"distill {config.loss} step {done} loss {loss:.4f}{rate}{rkl}"
                progress.update(1)
    finally:
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()
        batches_in.close()
        if onpolicy is not None:
            onpolicy.close()
    save_checkpoint(out, config.max_steps, model, tokenizer, optimizer, scheduler, batches_in, noise, config, onpolicy, world, metrics.rows if metrics else 0, rollout_noise, run_meta)
    model_state, _ = full_state(model, None, world, fsdp=config.fsdp) if config.fsdp and world.distributed else (None, None)
    if world.main:
        final = out / "final"
        shutil.rmtree(final, ignore_errors=True)
        model.save_pretrained(final, state_dict=model_state)
        tokenizer.save_pretrained(final)
    world.barrier()
    return last
