"""On-policy rounds: the student samples continuations, an online teacher scores them.

Every ``sample_every`` steps ``distill`` takes ``sample_prompts`` prompts (the
prompt part of the cached data, in a seeded order of its own), samples a
continuation for each from the current student (transformers ``generate``
with the student's weights at that step, so no weight sync is needed),
has the online teacher score prompt + continuation (actual-token log-prob and
top-k: the content of a cache entry) and keeps the last ``onpolicy_buffer``
rollouts. Until the next round, each step adds one micro-batch of rollouts to
the cached ones; the step's loss is ``(1 - w) * L_cached + w * L_onpolicy``,
each part normalised by its own response tokens, ``w = onpolicy_weight``.

The quality curve of a round: the teacher-scored reverse KL of the student's
own samples, per sampled token ``log pi_s(y) - log p_T(y)`` (pi_s at
temperature 1, whatever the sampling temperature), and the teacher's NLL of
them.

The online teacher may be wider or narrower than the student (one tokenizer,
embeddings padded to different sizes). Its top-k ids are never indexed into the
student's logits here: rollouts go through the losses, which drop ids past the
student's width (hpd_tools.losses, "Widths"). The other way round, a student
wider than the teacher can sample an id the teacher has no row for: such a
continuation is cut before that token (``onpolicy/frac_cut_past_teacher``).

A teacher that cannot be reached (server down, timeouts after retries) does
not stop training: the round is skipped with a warning in the log and
``onpolicy/teacher_unavailable`` in the metrics; training goes on with the
cached data and the rollouts already in the buffer.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cache.reader import Batch, CachedSequence, CacheReader, collate
from .engines.base import LOGPROB_CHUNK_ROWS, Scored, chunked_logprobs
from .errors import HPDError, TeacherUnavailable

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """A sampled continuation with its teacher scores, in the cache's convention
    (position i is about token i+1; loss_mask marks the sampled tokens)."""

    tokens: np.ndarray  # int64 [L]
    loss_mask: np.ndarray  # bool [L]
    label_logprob: np.ndarray  # float32 [L]
    topk_ids: np.ndarray  # int64 [L, k]
    topk_logprobs: np.ndarray  # float32 [L, k]
    truncated: bool

    def as_sequence(self) -> CachedSequence:
        return CachedSequence(-1, 0, self.tokens, self.loss_mask, self.label_logprob, self.topk_ids, self.topk_logprobs)


def make_online_teacher(spec: str, *, engine: str, k: int, max_length: int, engine_args: dict[str, Any]) -> Any:
    """A URL is a running vLLM server; a folder is loaded in-process (vLLM or hf)."""
    if spec.startswith(("http://", "https://")):
        from .engines.server import ServerTeacher

        return ServerTeacher(spec, max_length=max_length, **engine_args)
    if not Path(spec).is_dir():
        raise HPDError(f"--online-teacher {spec}: neither an http(s) URL nor a model folder")
    from .engines import make_teacher

    if engine == "vllm":
        # Small and co-resident with training: a bounded KV cache and GPU share.
        import torch as _torch

        sizing = {"gpu_memory_utilization": 0.2} if _torch.cuda.is_available() else {}
        engine_args = {"enforce_eager": True, **sizing, **engine_args}
    return make_teacher(engine, spec, k=k, max_length=max_length, engine_args=engine_args)


def prompt_of(seq: CachedSequence) -> np.ndarray | None:
    """The tokens before the first response token (None if the sequence has none)."""
    first = np.flatnonzero(seq.loss_mask)
    return None if not len(first) else seq.tokens[: first[0] + 1]


def rollout_from(prompt: np.ndarray, completion: np.ndarray, scored: Scored, truncated: bool) -> Rollout:
    tokens = np.concatenate([prompt, completion]).astype(np.int64)
    n, k = len(tokens), scored.topk_ids.shape[1]
    mask = np.zeros(n, dtype=bool)
    mask[len(prompt) - 1 : n - 1] = True
    label = np.zeros(n, dtype=np.float32)
    label[: n - 1] = scored.label_logprob
    ids = np.zeros((n, k), dtype=np.int64)
    lps = np.zeros((n, k), dtype=np.float32)
    ids[: n - 1][mask[: n - 1]] = scored.topk_ids[mask[: n - 1]]
    lps[: n - 1][mask[: n - 1]] = scored.topk_logprobs[mask[: n - 1]]
    return Rollout(tokens, mask, label, ids, lps, truncated)


def _within_width(completions: list[tuple[np.ndarray, bool]], ls: list[np.ndarray], width: int) -> tuple[list[tuple[np.ndarray, bool]], list[np.ndarray], int]:
    """Each continuation cut before its first token >= ``width`` (the teacher has no
    row for it), with its student log-probs; marked truncated. Also the count cut."""
    out, out_ls, cut = [], [], 0
    for (comp, truncated), lp in zip(completions, ls):
        past = np.flatnonzero(comp >= width)
        if len(past):
            comp, lp, truncated, cut = comp[: past[0]], lp[: past[0]], True, cut + 1
        out.append((comp, truncated))
        out_ls.append(lp)
    return out, out_ls, cut


class OnPolicy:
    """Sampling rounds, the rollout buffer and its share of each step."""

    def __init__(self, config: Any, tokenizer: Any, prompt_cache: str, k: int, max_length: int, rank: int = 0, world_size: int = 1):
        self.config = config
        self.tokenizer = tokenizer
        self.k = k
        self.max_length = max_length
        self.prompts = CacheReader(prompt_cache, seed=config.seed + 1000, rank=rank, world_size=world_size)  # each rank its own prompts
        self.expected_vocab = int(self.prompts.store.attrs["teacher"].get("vocab_size") or 0)
        # The cursor: (epoch, sequences taken) of the prompt order, and the open
        # stream positioned there (rebuilt from the cursor after a resume).
        self.prompt_epoch, self.prompt_taken = 0, 0
        self._prompt_stream: Any = None
        self.buffer: deque[Rollout] = deque(maxlen=config.onpolicy_buffer)
        self.rng = np.random.default_rng([config.seed, 11, rank])
        self.teacher: Any = None
        self.unavailable = 0

    # -- state -------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"prompt_epoch": self.prompt_epoch, "prompt_taken": self.prompt_taken, "rng": self.rng.bit_generator.state}

    def buffer_arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"count": np.array(len(self.buffer))}
        for i, r in enumerate(self.buffer):
            for name in ("tokens", "loss_mask", "label_logprob", "topk_ids", "topk_logprobs"):
                out[f"{i}/{name}"] = getattr(r, name)
            out[f"{i}/truncated"] = np.array(r.truncated)
        return out

    def load_state(self, state: dict[str, Any], arrays: dict[str, np.ndarray] | None) -> None:
        self.prompt_epoch, self.prompt_taken = int(state["prompt_epoch"]), int(state["prompt_taken"])
        self._prompt_stream = None
        self.rng.bit_generator.state = state["rng"]
        self.buffer.clear()
        if arrays is not None:
            for i in range(int(arrays["count"])):
                self.buffer.append(Rollout(*(arrays[f"{i}/{n}"] for n in ("tokens", "loss_mask", "label_logprob", "topk_ids", "topk_logprobs")), bool(arrays[f"{i}/truncated"])))

    # -- a round -----------------------------------------------------------------
    def _next_prompts(self, n: int) -> list[np.ndarray]:
        """The next ``n`` usable prompts of this rank's prompt order. The order is
        computed once per epoch and units are read once (tokens and loss_mask
        only), so a prompt costs O(1), not a pass over the cache's order."""
        out: list[np.ndarray] = []
        # Sequences and epoch ends passed since the last usable prompt: past every
        # sequence twice over (any split of them among ranks), there is none to find.
        misses, limit = 0, 2 * (len(self.prompts) + self.prompts.world_size)
        while len(out) < n:
            if misses > limit:
                raise HPDError(f"--prompt-cache {self.prompts.store.path}: no sequence for this rank has a prompt shorter than "
                               f"{self.max_length - 1} tokens followed by a response; use another --prompt-cache")
            if self._prompt_stream is None:
                self._prompt_stream = self.prompts.sequences(self.prompt_epoch, start=self.prompt_taken, form="tokens")
            seq = next(self._prompt_stream, None)
            if seq is None:
                self.prompt_epoch, self.prompt_taken, self._prompt_stream = self.prompt_epoch + 1, 0, None
                misses += 1
                continue
            self.prompt_taken += 1
            prompt = prompt_of(seq)
            if prompt is not None and len(prompt) + 1 < self.max_length:
                out.append(prompt.astype(np.int64))  # a copy: the unit it views is dropped once read
                misses = 0
            else:
                misses += 1
        return out

    @torch.no_grad()
    def _sample(self, model: Any, prompts: list[np.ndarray], device: torch.device, world: Any = None) -> list[tuple[np.ndarray, bool]]:
        """Continuations from the student, left-padded batch, up to EOS or the limit.

        With ``world`` (FSDP2: every forward is a collective), every rank runs the
        same number of decoding steps: the smallest limit of any rank, without
        stopping at EOS; each continuation is then cut at its first EOS, which
        leaves the distribution of what is kept unchanged."""
        c = self.config
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos = self.tokenizer.eos_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attn = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.from_numpy(p)
            attn[i, width - len(p):] = 1
        was_training = model.training
        model.eval()
        limit = min(c.sample_max_new_tokens, self.max_length - width)
        stop_at = eos
        if world is not None:
            limit = int(min(world.gather(limit)))
            stop_at = int(model.config.vocab_size)  # an id past the vocabulary, never sampled: no early stop
        out = model.generate(
            input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=True, temperature=c.sample_temperature,
            top_k=0, top_p=1.0, max_new_tokens=max(limit, 1), eos_token_id=stop_at, pad_token_id=pad,
        )
        model.train(was_training)
        completions = []
        for row in out[:, width:].cpu().numpy():
            hits = np.flatnonzero(row == eos) if eos is not None else []
            if len(hits):
                completions.append((row[: hits[0] + 1], False))
            else:
                completions.append((row, True))
        return completions

    @torch.no_grad()
    def _student_logprobs(self, model: Any, prompts: list[np.ndarray], completions: list[np.ndarray], device: torch.device) -> list[np.ndarray]:
        """log pi_s (temperature 1) of each completion's tokens.

        Only the completions' positions reach the LM head, in chunks of
        ``loss_chunk_tokens`` rows (gather + logsumexp): never [batch, length, vocab]."""
        seqs = [np.concatenate([p, c]).astype(np.int64) for p, c in zip(prompts, completions)]
        width = max(len(x) for x in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        attn = torch.zeros_like(ids)
        scored = torch.zeros((len(seqs), width - 1), dtype=torch.bool)  # position i predicts token i+1
        for i, (x, p, c) in enumerate(zip(seqs, prompts, completions)):
            ids[i, : len(x)] = torch.from_numpy(x)
            attn[i, : len(x)] = 1
            scored[i, len(p) - 1 : len(p) - 1 + len(c)] = True
        labels = ids[:, 1:][scored]
        was_training = model.training
        model.eval()
        try:
            hidden = model.base_model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False).last_hidden_state
        finally:
            model.train(was_training)
        rows = hidden[:, :-1][scored.to(hidden.device)]
        del hidden
        chunk = int(getattr(self.config, "loss_chunk_tokens", 0) or LOGPROB_CHUNK_ROWS)
        lp, _, _ = chunked_logprobs(model.get_output_embeddings(), rows, labels, chunk_rows=chunk)
        return list(np.split(lp.cpu().numpy(), np.cumsum([len(c) for c in completions])[:-1]))

    def round(self, model: Any, device: torch.device, lockstep: Any = None) -> dict[str, Any]:
        """Sample, score, add to the buffer. Returns the round's metrics. The student's
        forwards run under the run's ``--dtype`` autocast (``config.dtype``, float32 without one).

        ``lockstep``: the World, when every student forward is a collective
        (FSDP2); all ranks then make the same forwards, whatever their teacher
        answers."""
        from .distill import autocast

        c = self.config
        prompts = self._next_prompts(c.sample_prompts)
        t0 = time.time()
        with autocast(getattr(c, "dtype", "float32"), device):  # the training forward's precision
            completions = self._sample(model, prompts, device, lockstep)
            sample_s = time.time() - t0
            ls = self._student_logprobs(model, prompts, [comp for comp, _ in completions], device)
        t0 = time.time()
        try:
            if self.teacher is None:
                self.teacher = make_online_teacher(c.online_teacher, engine=c.online_engine, k=self.k, max_length=self.max_length, engine_args=c.online_engine_args)
                # A folder's tokenizer is compared by hash (distill); a server's only by its width.
                url = c.online_teacher.startswith(("http://", "https://"))
                if url and self.expected_vocab and self.teacher.vocab_size != self.expected_vocab:
                    raise HPDError(f"--online-teacher {c.online_teacher}: logits width {self.teacher.vocab_size}, the cache's teacher has {self.expected_vocab}; serve the cache's teacher (or a model with its tokenizer and width)")
            completions, ls, cut = _within_width(completions, ls, self.teacher.vocab_size)
            sequences = [np.concatenate([p, comp]) for p, (comp, _) in zip(prompts, completions)]
            scores = self.teacher.score(sequences, self.k)
        except TeacherUnavailable as exc:
            self.unavailable += 1
            log.warning("on-policy round skipped: %s; training continues on cached data%s", exc, " and buffered rollouts" if self.buffer else "")
            return {"onpolicy/teacher_unavailable": 1, "onpolicy/unavailable_rounds": self.unavailable, "onpolicy/buffer": len(self.buffer)}
        score_s = time.time() - t0
        rollouts = [rollout_from(p, comp, sc, trunc) for p, (comp, trunc), sc in zip(prompts, completions, scores)]
        lt = [r.label_logprob[:-1][r.loss_mask[:-1]] for r in rollouts]
        n_sampled = sum(len(x) for x in lt)
        self.buffer.extend(r for r in rollouts if r.loss_mask.any())  # a continuation cut to nothing trains nothing
        gen_tokens = sum(len(comp) for comp, _ in completions)
        return {
            "onpolicy/rkl": float(sum((a - b).sum() for a, b in zip(ls, lt)) / max(n_sampled, 1)),
            "onpolicy/teacher_nll": float(-sum(x.sum() for x in lt) / max(n_sampled, 1)),
            "onpolicy/mean_length": gen_tokens / len(completions),
            "onpolicy/frac_truncated": float(np.mean([t for _, t in completions])),
            "onpolicy/sample_tokens_per_s": gen_tokens / sample_s if sample_s else None,
            "onpolicy/score_tokens_per_s": sum(len(s) for s in sequences) / score_s if score_s else None,
            "onpolicy/sample_seconds": sample_s,
            "onpolicy/score_seconds": score_s,
            "onpolicy/buffer": len(self.buffer),
            "onpolicy/frac_cut_past_teacher": cut / len(completions),
            "onpolicy/teacher_unavailable": 0,
        }

    def next_batch(self, batch_tokens: int) -> Batch | None:
        """Rollouts drawn from the buffer (seeded), up to ``batch_tokens`` padded tokens."""
        if not self.buffer:
            return None
        picks: list[CachedSequence] = []
        width = 0
        for i in self.rng.permutation(len(self.buffer)).tolist():
            seq = self.buffer[i].as_sequence()
            if picks and max(width, len(seq.tokens)) * (len(picks) + 1) > batch_tokens:
                break
            picks.append(seq)
            width = max(width, len(seq.tokens))
        return collate(picks, self.k)

    def close(self) -> None:
        if self._prompt_stream is not None:
            self._prompt_stream.close()
            self._prompt_stream = None
        if self.teacher is not None:
            self.teacher.close()
            self.teacher = None
