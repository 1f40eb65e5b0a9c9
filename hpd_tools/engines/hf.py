"""Hugging Face transformers teacher: forward pass + top-k, the reference engine.

On a GPU it runs in bfloat16 (``dtype="auto"``; float32 on CPUs and GPUs without
bf16), on the current GPU when the weights fit there, else spread over every
visible GPU (and CPU memory past them) by accelerate's ``device_map="auto"``;
the choice is made from the weight files' headers before anything loads.

Scores are taken from the hidden states: the LM head runs on chunks of at most
``chunk_rows`` positions and each chunk's log-softmax is a logsumexp, so the
largest tensor is [chunk_rows, vocab] float32 (1.2 GB at 2,048 x 152k), not
[batch tokens, vocab] (5 GB at 8k tokens). A model whose logits are not its
head applied to its last hidden state (final soft-capping, a logit scale) is
found at start-up and scored from its own logits, chunked the same way.

Sampled scoring (``samples=N``): the same chunks' log-softmax feeds
:func:`hpd_tools.sampling.sample_rows`, per record with its seed and its rows'
positions, so no [batch, length, vocab] float32 tensor exists beyond a chunk.

Engine options (``--vllm-arg`` on the cache command, ``engine_args`` from
Python, ``online_engine_args`` for an online teacher): ``attn_implementation``
(``sdpa``, ``eager``, ``flash_attention_2``, ...: passed to ``from_pretrained``).
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import HPDError
from .base import LOGPROB_CHUNK_ROWS, Scored, chunked_logprobs

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                      "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
# Engine options the hf engine takes, with their types (check_engine_args).
HF_OPTIONS: dict[str, Any] = {"attn_implementation": str}


def auto_dtype() -> str:
    """``--dtype auto`` for the hf engine: bfloat16 on a GPU that has it, else float32."""
    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def weight_bytes(model_dir: str | Path, dtype: str) -> int | None:
    """Bytes the weights take once loaded in ``dtype``, from the safetensors headers
    (parameter counts; nothing is loaded). Floating-point tensors count at ``dtype``,
    others at their stored width. Without safetensors, the weight files' sizes;
    None when there are no weight files."""
    root = Path(model_dir)
    width = torch.empty((), dtype=_DTYPES[dtype]).element_size()
    total, seen = 0, False
    for path in sorted(root.glob("*.safetensors")):
        seen = True
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = int(np.prod(info["shape"], dtype=np.int64)) if info["shape"] else 1
            stored = info["dtype"]
            total += count * (width if stored.startswith(("F", "BF")) else _SAFETENSORS_BYTES.get(stored, 4))
    if seen:
        return total
    files = [p for pattern in ("*.bin", "*.pt", "*.pth") for p in root.glob(pattern)]
    return sum(p.stat().st_size for p in files) if files else None


def scoring_reserve(config: dict[str, Any], batch_tokens: int, chunk_rows: int = LOGPROB_CHUNK_ROWS) -> int:
    """Memory beside the weights while scoring, estimated: a layer's activations for
    ``batch_tokens`` tokens (hidden and MLP width, bf16, a few copies) and the
    chunk's logits (model dtype, float32, top-k)."""
    text = config.get("text_config") or {}
    hidden = int(config.get("hidden_size") or text.get("hidden_size") or 4096)
    inner = int(config.get("intermediate_size") or text.get("intermediate_size") or 4 * hidden)
    vocab = int(config.get("vocab_size") or text.get("vocab_size") or 32000)
    return batch_tokens * (4 * hidden + 3 * inner) * 2 * 2 + chunk_rows * vocab * 10


def choose_placement(need: int | None, free: int | None) -> str:
    """``"device"`` when ``need`` bytes (weights plus the scoring reserve) fit in 90% of
    the current GPU's ``free`` bytes (or either is unknown), else ``"auto"`` (accelerate
    spreads the layers over every visible GPU, then CPU memory)."""
    if need is None or free is None:
        return "device"
    return "device" if need <= 0.9 * free else "auto"


class HFTeacher:
    """Scores sequences with ``AutoModelForCausalLM`` in batches of at most
    ``batch_tokens`` (padded) tokens; log-probs in float32, ``chunk_rows``
    positions at a time (module docstring)."""

    name = "hf"

    def __init__(
        self,
        model_dir: str,
        *,
        dtype: str = "auto",
        batch_tokens: int = 8192,
        device: str | None = None,
        attn_implementation: str | None = None,
        chunk_rows: int = LOGPROB_CHUNK_ROWS,
    ):
        import transformers
        from transformers import AutoModelForCausalLM

        self.version = transformers.__version__
        dtype = auto_dtype() if dtype == "auto" else dtype
        if dtype not in _DTYPES:
            raise HPDError(f"--dtype {dtype}: the hf engine takes auto, float32, bfloat16 or float16")
        self.dtype = dtype
        self.batch_tokens = batch_tokens
        self.chunk_rows = chunk_rows
        kwargs: dict[str, Any] = {"dtype": _DTYPES[dtype]}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        target = torch.device(device) if device else (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
        placement = "device"
        if device is None and target.type == "cuda":
            config = json.loads((Path(model_dir) / "config.json").read_text())
            weights = weight_bytes(model_dir, dtype)
            need = None if weights is None else weights + scoring_reserve(config, batch_tokens, chunk_rows)
            free = int(torch.cuda.mem_get_info(target)[0])
            placement = choose_placement(need, free)
            if placement == "auto":
                log.info("hf teacher: %.1f GiB of %s weights and scoring memory do not fit the %.1f GiB free on %s; device_map=auto over %d GPU(s)",
                         need / 2**30, dtype, free / 2**30, target, torch.cuda.device_count())
                kwargs["device_map"] = "auto"
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
        except (ValueError, ImportError) as exc:
            if attn_implementation is None:
                raise
            raise HPDError(f"attn_implementation={attn_implementation}: transformers refused it for {model_dir} ({str(exc).splitlines()[0]}); "
                           "choose sdpa or eager, or install the kernel it names") from None
        self.model = model if placement == "auto" else model.to(target)
        self.model.eval()
        self.input_device = self.model.get_input_embeddings().weight.device
        self.device = self.input_device
        self.vocab_size = int(self.model.config.vocab_size)
        self.from_hidden = self._head_gives_logits()
        if not self.from_hidden:
            log.warning("hf teacher %s: its logits are not its LM head on the last hidden state (soft-capping or scaling); "
                        "scoring from the model's own [batch, length, vocab] logits", model_dir)

    @torch.inference_mode()
    def _head_gives_logits(self) -> bool:
        """Whether head(last hidden state) is the model's logits, on a short probe."""
        base, head = getattr(self.model, "base_model", None), self.model.get_output_embeddings()
        if base is None or head is None or base is self.model:
            return False
        ids = (torch.arange(8) % self.vocab_size)[None].to(self.input_device)
        full = self.model(input_ids=ids, use_cache=False).logits.float()
        mine = head(base(input_ids=ids, use_cache=False).last_hidden_state).float()
        return bool(full.shape == mine.shape and torch.allclose(full, mine.to(full.device), rtol=1e-3, atol=1e-3))

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches: list[list[int]] = []
        for i in order:
            if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= self.batch_tokens:
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    @torch.inference_mode()
    def score(self, sequences: Sequence[np.ndarray], k: int, *, samples: int = 0, seeds: Sequence[int] | None = None) -> list[Scored]:
        if samples and (seeds is None or len(seeds) != len(sequences)):
            raise ValueError(f"samples={samples} needs one seed per sequence ({len(sequences)}), got {None if seeds is None else len(seeds)}")
        out: list[Scored | None] = [None] * len(sequences)
        lengths = [len(s) for s in sequences]
        for batch in self._batches(lengths):
            width = lengths[batch[0]]
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : lengths[i]] = torch.from_numpy(np.asarray(sequences[i], dtype=np.int64))
                mask[row, : lengths[i]] = 1
            has_next = mask[:, 1:].bool()  # position i is scored on token i+1: rows 0 .. length-2
            labels = ids[:, 1:][has_next]
            inputs = {"input_ids": ids.to(self.input_device), "attention_mask": mask.to(self.input_device), "use_cache": False}
            if self.from_hidden:
                states = self.model.base_model(**inputs).last_hidden_state
                logits_of = self.model.get_output_embeddings()
            else:
                states = self.model(**inputs).logits
                logits_of = _identity
            rows = states[:, :-1][has_next.to(states.device)]
            del states
            if samples:
                records = [(lengths[i] - 1, int(seeds[i])) for i in batch]  # type: ignore[index]
                label, top_lp, top_ids, counts = chunked_samples(logits_of, rows, labels, records, samples, chunk_rows=self.chunk_rows)
                counts = counts.cpu().numpy()
            else:
                label, top_lp, top_ids = chunked_logprobs(logits_of, rows, labels, k=k, chunk_rows=self.chunk_rows)
            label, top_lp, top_ids = label.cpu().numpy(), top_lp.cpu().numpy(), top_ids.cpu().numpy()
            start = 0
            for i in batch:
                m = lengths[i] - 1
                out[i] = Scored(label[start : start + m], top_ids[start : start + m], top_lp[start : start + m],
                                counts[start : start + m] if samples else None)
                start += m
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _identity(x: Any) -> Any:
    return x


def chunked_samples(logits_of: Any, rows: Any, labels: Any, records: Sequence[tuple[int, int]], n: int,
                    *, chunk_rows: int = LOGPROB_CHUNK_ROWS) -> tuple[Any, Any, Any, Any]:
    """:func:`chunked_logprobs` for a sampled call: the label log-probs [R] and, per row,
    ``n`` seeded draws (:func:`hpd_tools.sampling.sample_rows`) as distinct ids long [R, n],
    their exact log-probs float32 [R, n] and counts int32 [R, n].

    ``rows`` are the records' rows one after another, ``records`` each record's
    (row count, seed); a record's row j is its position j, whatever chunk it lands in,
    so the draws do not depend on the batching. One [chunk_rows, V] float32 block of
    log-probs at a time (plus what the draw needs: its exp and cumulative sum), no host
    synchronisation."""
    from ..sampling import sample_rows

    total = int(rows.shape[0])
    starts = np.cumsum([0] + [m for m, _ in records])
    label = ids = lps = counts = None
    for a in range(0, total, chunk_rows):
        b = min(a + chunk_rows, total)
        z = logits_of(rows[a:b]).float()
        lp = z - torch.logsumexp(z, dim=-1, keepdim=True)
        del z
        if label is None:
            label = torch.empty(total, dtype=torch.float32, device=lp.device)
            ids = torch.empty((total, n), dtype=torch.long, device=lp.device)
            lps = torch.empty((total, n), dtype=torch.float32, device=lp.device)
            counts = torch.empty((total, n), dtype=torch.int32, device=lp.device)
        label[a:b] = lp.gather(-1, labels[a:b, None].to(lp.device))[:, 0]
        # The records this chunk holds rows of: one draw call each (its own seed).
        first = int(np.searchsorted(starts, a, side="right")) - 1
        for r in range(first, len(records)):
            r0, r1 = max(int(starts[r]), a), min(int(starts[r + 1]), b)
            if r0 >= b:
                break
            if r1 <= r0:
                continue
            positions = torch.arange(r0 - int(starts[r]), r1 - int(starts[r]), device=lp.device)
            ids[r0:r1], lps[r0:r1], counts[r0:r1] = sample_rows(lp[r0 - a : r1 - a], records[r][1], positions, n)
        del lp
    if label is None:  # no rows
        device = getattr(rows, "device", None)
        label = torch.empty(0, dtype=torch.float32, device=device)
        ids = torch.empty((0, n), dtype=torch.long, device=device)
        lps = torch.empty((0, n), dtype=torch.float32, device=device)
        counts = torch.empty((0, n), dtype=torch.int32, device=device)
    return label, lps, ids, counts
