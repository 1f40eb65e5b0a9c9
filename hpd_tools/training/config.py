"""The run's options: ``DistillConfig``, their checks, and the schedule and
precision they imply."""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from ..config import check_choices, flag_of, option
from ..errors import HPDError
from ..losses import LOSSES, Targets, compute_loss

DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class DistillConfig:
    """Everything ``hpd-tools distill`` takes (recipes/*.yaml map onto it)."""

    caches: list[str] = option(flag="--cache", help="Teacher cache to train on. Repeat to mix several.")
    student: str = option(help="Student: a model folder or a Hugging Face Hub id (any transformers causal LM).")
    out: str = option(help="Run folder: metrics.jsonl, checkpoints, final/. New, empty, or an earlier run (with --resume).")
    cache_weights: list[float] = option(default_factory=list, flag="--cache-weight",
                                        help="Sampling weight of each --cache, in order (default: equal).")
    loss: str = option("hpd", choices=tuple(LOSSES), help="The distillation loss (sft: the labels only).")
    loss_options: dict[str, Any] = option(default_factory=dict, flag="--loss-option",
                                          help="KEY=VALUE passed to the loss (e.g. tail=renormalize, beta=0.5). Repeatable.")
    max_steps: int = option(100, help="Optimizer steps.")
    batch_tokens: int = option(4096, help="Padded tokens per micro-batch.")
    grad_accum: int = option(1, help="Micro-batches per optimizer step.")
    lr: float = option(5e-5, help="Peak learning rate (AdamW).")
    min_lr_ratio: float = option(0.1, help="The cosine schedule's final learning rate, as a share of --lr.")
    warmup_steps: int = option(0, help="Steps of linear warmup to --lr.")
    weight_decay: float = option(0.0, help="AdamW weight decay.")
    betas: tuple[float, float] = option((0.9, 0.95), help="AdamW betas: two numbers in [0, 1).")
    max_grad_norm: float = option(1.0, help="Gradients are clipped to this norm.")
    dtype: str = option("auto", choices=DTYPES, help="The student's forward precision: auto is bfloat16 autocast on CUDA GPUs with bf16, "
                        "float32 elsewhere (TF32 matmuls on CUDA). Weights stay float32.")
    attn_implementation: str | None = option(None,
                                             help="The student's attention, as transformers names it (sdpa, eager, flash_attention_2, ...). "
                                             "Default: transformers' choice.")
    loss_chunk_tokens: int = option(1024, help="Tokens whose [tokens, vocab] logits exist at once.")
    eval_cache: str | None = option(None, help="Held-out cache for eval metrics.")
    eval_every: int = option(0, help="Steps between evals (0: only with --eval-cache at the end).")
    eval_batches: int = option(0, help="Batches of --eval-cache per eval (0: all of it).")
    # The dense reference (hpd_tools/training/dense.py)
    dense_teacher: str | None = option(None, help="Train from this teacher's full distribution, computed online each step (a model folder or Hub id "
                                       "sharing the student's tokenizer) on the caches' sequences; their stored teacher arrays are not used.")
    eval_teacher: str | None = option(None, help="Evaluation also reports eval/full_fkl, forward KL to this teacher's full distribution on --eval-cache "
                                      "(a model folder or Hub id; default: --dense-teacher).")
    save_every: int = option(0, help="Steps between checkpoints (0: only the final one).")
    keep_checkpoints: int = option(0, help="Keep the newest N step-* checkpoints, deleting older ones after each save (0: keep all).")
    log_every: int = option(1, help="Steps between metrics rows.")
    seed: int = option(0, help="Seed of the data order, the loss's noise and on-policy sampling.")
    resume: bool = option(False, help="Continue from the latest checkpoint in --out (with the options it was trained with).")
    # On-policy rounds (hpd_tools/onpolicy.py)
    online_teacher: str | None = option(None,
                                        help="On-policy scorer: a model folder or Hub id (in-process), or the URL of a running vLLM server.")
    online_engine: str = option("vllm", choices=("vllm", "hf"), help="Engine for a folder --online-teacher.")
    online_engine_args: dict[str, Any] = option(default_factory=dict, flag="--online-engine-arg",
                                                help="KEY=VALUE passed to the --online-teacher's engine (vllm.LLM, transformers, "
                                                     "or the server client). Repeatable.")
    sample_every: int = option(0, help="Steps between on-policy rounds (0: none).")
    sample_prompts: int = option(8, help="Prompts per round.")
    sample_max_new_tokens: int = option(64, help="Tokens the student samples per prompt, at most.")
    sample_temperature: float = option(1.0, help="The student's sampling temperature in on-policy rounds (not the loss's).")
    onpolicy_weight: float = option(0.5, help="Share of each step's loss from rollouts.")
    onpolicy_buffer: int = option(64, help="Scored rollouts kept and reused.")
    prompt_cache: str | None = option(None, help="Cache whose prompts are sampled from (default: the first --cache).")
    # Under torchrun (hpd_tools/parallel.py)
    fsdp: bool = option(False, help="Under torchrun: shard the student with FSDP2 instead of replicating it with DDP.")
    pack: bool = option(False, flag="--pack/--no-pack",
                        help="Pack sequences end to end (each attends to itself only) instead of padding them.")
    pack_width: int = option(0, help="With --pack: tokens per packed row (0: --batch-tokens, one row).")
    # hpd_tools/training/metrics.py
    report_to: list[str] = option(default_factory=lambda: ["tensorboard"], form="comma",
                                  help="Dashboards beside metrics.jsonl, comma-separated: tensorboard, wandb, none.")

    def validate(self) -> None:
        """Every option's type, range and combination; each error names the option
        as the command line spells it (recipes go through here too)."""
        if not self.caches:
            raise HPDError("--cache: give at least one cache")
        check_choices(self)  # --loss, --dtype, --online-engine
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
        if self.attn_implementation is not None and not (isinstance(self.attn_implementation, str) and self.attn_implementation.strip()):
            raise HPDError(f"--attn-implementation {self.attn_implementation!r}: give an implementation transformers knows (sdpa, eager, flash_attention_2, ...)")
        for name in ("dense_teacher", "eval_teacher"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value.strip()):
                raise HPDError(f"{_flag(name)} {value!r}: give a model folder or a Hugging Face Hub id")
        if self.eval_teacher and not self.eval_cache:
            raise HPDError(f"--eval-teacher {self.eval_teacher} needs --eval-cache (the held-out records it scores)")
        if self.dense_teacher and self.loss == "sft":
            raise HPDError(f"--dense-teacher {self.dense_teacher} with --loss sft: sft trains on the data tokens only; choose a distillation loss")
        if self.eval_every and not self.eval_cache:
            raise HPDError("--eval-every needs --eval-cache")
        if self.sample_every and not self.online_teacher:
            raise HPDError("--sample-every needs --online-teacher")
        if self.online_teacher and not self.sample_every:
            raise HPDError("--online-teacher needs --sample-every N (steps between on-policy rounds)")
        if self.online_teacher and self.online_engine_args:
            from ..engines import check_engine_args

            if self.online_teacher.startswith(("http://", "https://")):
                check_engine_args("server", self.online_engine_args, where="--online-engine-arg", reserved={"url": "--online-teacher"})
            else:
                check_engine_args(self.online_engine, self.online_engine_args, where="--online-engine-arg",
                                  reserved={"model": "--online-teacher"})
        if self.pack_width and not self.pack:
            raise HPDError(f"--pack-width {self.pack_width}: give a positive width, with --pack")
        if self.warmup_steps > self.max_steps:
            raise HPDError(f"--warmup-steps {self.warmup_steps}: must be between 0 and --max-steps {self.max_steps}")
        check_loss_options(self.loss, self.loss_options)
        from .metrics import check_report_to

        check_report_to(list(self.report_to))


# Integer options and their smallest value. --batch-tokens: a sequence longer
# than the budget is a batch of its own, so any budget trains; 2 is the smallest
# that can hold one training position.
_INT_MINIMUMS = {
    "max_steps": 1, "batch_tokens": 2, "grad_accum": 1, "loss_chunk_tokens": 1, "log_every": 1, "seed": 0,
    "warmup_steps": 0, "save_every": 0, "keep_checkpoints": 0, "eval_every": 0, "eval_batches": 0, "pack_width": 0,
    "sample_every": 0, "sample_prompts": 1, "sample_max_new_tokens": 1, "onpolicy_buffer": 1,
}
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
    return flag_of(DistillConfig, name)


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

