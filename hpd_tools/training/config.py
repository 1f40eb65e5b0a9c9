"""The run's options: ``DistillConfig``, their checks, and the schedule and
precision they imply."""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import HPDError
from ..losses import LOSSES, Targets, compute_loss


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
    # Dashboards beside metrics.jsonl: tensorboard, wandb, or none (hpd_tools/training/metrics.py)
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])

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

