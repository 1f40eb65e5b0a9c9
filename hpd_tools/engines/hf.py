"""Hugging Face transformers teacher: forward pass + top-k, the reference engine."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .base import Scored

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFTeacher:
    """Scores sequences with ``AutoModelForCausalLM`` in batches of at most
    ``batch_tokens`` (padded) tokens. The log-softmax is taken in float32."""

    name = "hf"

    def __init__(self, model_dir: str, *, dtype: str = "float32", batch_tokens: int = 8192, device: str | None = None):
        import transformers
        from transformers import AutoModelForCausalLM

        self.version = transformers.__version__
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_DTYPES[dtype]).to(self.device).eval()
        self.vocab_size = int(self.model.config.vocab_size)
        self.batch_tokens = batch_tokens

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
    def score(self, sequences: Sequence[np.ndarray], k: int) -> list[Scored]:
        out: list[Scored | None] = [None] * len(sequences)
        lengths = [len(s) for s in sequences]
        for batch in self._batches(lengths):
            width = lengths[batch[0]]
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : lengths[i]] = torch.from_numpy(np.asarray(sequences[i], dtype=np.int64))
                mask[row, : lengths[i]] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            top_lp, top_ids = logprobs.topk(k, dim=-1)
            label = logprobs.gather(-1, ids[:, 1:, None].to(self.device)).squeeze(-1)
            top_lp, top_ids, label = top_lp.cpu().numpy(), top_ids.cpu().numpy(), label.cpu().numpy()
            for row, i in enumerate(batch):
                m = lengths[i] - 1
                out[i] = Scored(label[row, :m], top_ids[row, :m], top_lp[row, :m])
        return out  # type: ignore[return-value]

    def close(self) -> None:
        del self.model
