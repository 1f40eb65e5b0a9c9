"""Sampled prompt scoring inside vLLM's model runner (issue 14).

vLLM returns only the top-k at prompt positions, and the full log-probs exist
only inside its model runner. For a request whose ``SamplingParams.extra_args``
carries :data:`SEED_KEY` (the record's draw seed) and ``prompt_logprobs=N``,
these hooks replace the runner's top-k gather by N seeded draws from the full
distribution (:func:`hpd_tools.sampling.uniforms` and :func:`~hpd_tools.sampling.draw`,
the functions the transformers engine uses, at the row's absolute position in
the prompt: the chunk's start plus the row, so chunked prefill draws the same
tokens). The row's ``N+1`` entries travel vLLM's own prompt-logprob path: the
label entry first, then the N raw draws (ids and their exact log-probs, with
repeats); the host reduces them to distinct ids and counts
(:func:`distinct_host`). The label's rank is set to :data:`DRAWN_RANK` (-1, never
a real rank) so the host can tell draws from a top-k that a worker without the
hook would have sent. Requests without the seed run vLLM's code unchanged.

Two runners, both hooked:

- V1 (``vllm.v1.worker.gpu_model_runner.GPUModelRunner``, also the CPU runner's
  base; vLLM's choice without Triton): ``_get_prompt_logprobs_dict`` runs
  vLLM's loop for the other requests and this module's copy of that loop for
  the sampled ones (the same bookkeeping: ``in_progress_prompt_logprobs_cpu``,
  ``num_computed_tokens`` as the chunk start), with the LM head applied per
  :data:`ROWS` rows.
- V2 (``vllm.v1.worker.gpu.sample.prompt_logprob.PromptLogprobsWorker``, vLLM
  0.32's default on GPUs): the request's seed is kept at ``add_request``; during
  ``compute_prompt_logprobs`` of a batch holding a sampled request the module's
  ``compute_prompt_logprobs_with_chunking`` is replaced by the same loop that,
  after vLLM's top-k of a chunk, overwrites the sampled rows' first N+1 columns.

Where the hooks reach: :func:`install` patches the classes in this process (the
engine core runs here on CPUs, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and, for
modules not imported yet, patches them as they load. On GPUs vLLM runs the
engine core and workers in other processes; there :func:`register`, the
``vllm.general_plugins`` entry point in pyproject.toml that vLLM calls in
every process it starts, installs them.

Cost per sampled row (30k rows/s, 150k vocabulary, float32): the log-softmax
vLLM computes anyway, then one exp and one cumulative sum over the vocabulary
(~4 passes of 600 KB: ~72 GB/s of memory traffic at 30k rows/s, ~1.5% of an
H200's 4.8 TB/s) and N binary searches (N * 18 steps), in place of the top-k
(V1; V2 computes its top-k for the batch too). No host synchronisation is
added: uniforms are made on the device from (seed, position, j), copies to
the host are vLLM's own non-blocking ones.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..sampling import draw, uniforms

SEED_KEY = "hpd_tools_sample_seed"
DRAWN_RANK = -1
ROWS = 1024  # LM-head rows at a time in the V1 loop: [ROWS, vocab] float32 blocks

_V1 = "vllm.v1.worker.gpu_model_runner"
_V2 = "vllm.v1.worker.gpu.sample.prompt_logprob"
# What each hook found: module name -> True (patched) or the reason it could not be.
status: dict[str, Any] = {}


def _seed_of(sampling_params: Any) -> int | None:
    extra = getattr(sampling_params, "extra_args", None)
    return None if not extra else extra.get(SEED_KEY)


def drawn_rows(logits: torch.Tensor, labels: torch.Tensor, seed: int, first: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``[rows, n+1]`` entries of prompt rows ``first, first+1, ...``: the label
    then n seeded draws, as int32 ids and float32 exact log-probs, on the logits' device."""
    lp = logits.log_softmax(dim=-1, dtype=torch.float32)
    positions = torch.arange(first, first + lp.shape[0], device=lp.device, dtype=torch.int64)
    ids = torch.cat((labels.to(lp.device, torch.int64).reshape(-1, 1), draw(lp, uniforms(seed, positions, n))), dim=1)
    return ids.to(torch.int32), lp.gather(1, ids)


def distinct_host(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`hpd_tools.sampling.distinct` on the host from the draws' own log-probs:
    ``ids`` [rows, n] (repeats allowed), ``logprobs`` [rows, n] the teacher log-prob of
    each. Returns (ids int64, log-probs float32, counts int32), each [rows, n], the
    distinct ids ordered by log-prob descending (ties by id), padded with 0 / -inf / 0."""
    rows, n = ids.shape
    order = np.argsort(ids, axis=1, kind="stable")
    s = np.take_along_axis(ids, order, 1).astype(np.int64, copy=False)
    sl = np.take_along_axis(logprobs, order, 1).astype(np.float32, copy=False)
    new = np.ones((rows, n), dtype=bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    group = np.cumsum(new, axis=1) - 1
    row = np.arange(rows)[:, None]
    counts = np.bincount((row * n + group).ravel(), minlength=rows * n).reshape(rows, n).astype(np.int32)
    uid = np.zeros((rows, n), dtype=np.int64)
    ulp = np.full((rows, n), -np.inf, dtype=np.float32)
    uid[row, group] = s
    ulp[row, group] = sl
    valid = counts > 0
    order = np.lexsort((uid, ~valid, -ulp), axis=-1)
    uid, ulp, counts, valid = (np.take_along_axis(a, order, 1) for a in (uid, ulp, counts, valid))
    uid[~valid] = 0
    return uid, ulp, counts


# --- V1 model runner -------------------------------------------------------------------------


def _v1_sampled(runner: Any, hidden_states: torch.Tensor, num_scheduled_tokens: dict[str, int], sampled: dict[str, int]) -> dict[str, Any]:
    """vLLM's ``_get_prompt_logprobs_dict`` loop for the sampled requests (same bookkeeping)."""
    from vllm.utils.torch_utils import async_tensor_h2d
    from vllm.v1.outputs import LogprobsTensors

    out: dict[str, Any] = {}
    completed = []
    for req_id, n in sampled.items():
        num_tokens = num_scheduled_tokens.get(req_id)
        if num_tokens is None:  # preempted in prefill
            continue
        request = runner.requests[req_id]
        if request.prompt_token_ids is None:
            continue
        seed = int(_seed_of(request.sampling_params))
        num_prompt_tokens = len(request.prompt_token_ids)
        tensors = request.in_progress_prompt_logprobs_cpu
        if tensors is None:
            tensors = LogprobsTensors.empty_cpu(num_prompt_tokens - 1, n + 1)
            request.in_progress_prompt_logprobs_cpu = tensors
        start = request.num_computed_tokens  # the chunk's first prompt row
        remaining = num_prompt_tokens - (start + 1)
        if num_tokens <= remaining:
            num_rows = num_tokens
        else:
            num_rows = remaining
            completed.append(req_id)
            out[req_id] = tensors
        if num_rows <= 0:
            continue
        offset = int(runner.query_start_loc.np[runner.input_batch.req_id_to_index[req_id]])
        for a in range(0, num_rows, ROWS):
            b = min(a + ROWS, num_rows)
            logits = runner.model.compute_logits(hidden_states[offset + a : offset + b])
            labels = async_tensor_h2d(request.prompt_token_ids[start + 1 + a : start + 1 + b], device=logits.device, dtype=torch.int64)
            ids, lps = drawn_rows(logits, labels, seed, start + a, n)
            rows = slice(start + a, start + b)
            tensors.logprob_token_ids[rows].copy_(ids, non_blocking=True)
            tensors.logprobs[rows].copy_(lps, non_blocking=True)
            tensors.selected_token_ranks[rows].fill_(DRAWN_RANK)
    for req_id in completed:
        del runner.num_prompt_logprobs[req_id]
        runner.requests[req_id].in_progress_prompt_logprobs_cpu = None
    if out:
        runner._sync_device()
    return out


def _patch_v1(module: Any) -> None:
    cls = getattr(module, "GPUModelRunner", None)
    original = getattr(cls, "_get_prompt_logprobs_dict", None)
    if original is None:
        status[_V1] = "GPUModelRunner._get_prompt_logprobs_dict is missing"
        return
    if getattr(original, "_hpd_sampling", False):
        status[_V1] = True
        return

    @functools.wraps(original)
    def prompt_logprobs(self: Any, hidden_states: torch.Tensor, num_scheduled_tokens: dict[str, int]) -> dict[str, Any]:
        pending = self.num_prompt_logprobs
        sampled = {r: n for r, n in pending.items() if r in self.requests and _seed_of(self.requests[r].sampling_params) is not None}
        if not sampled:
            return original(self, hidden_states, num_scheduled_tokens)
        for r in sampled:
            del pending[r]
        try:
            out = original(self, hidden_states, num_scheduled_tokens)
        finally:
            pending.update(sampled)
        out.update(_v1_sampled(self, hidden_states, num_scheduled_tokens, sampled))
        return out

    prompt_logprobs._hpd_sampling = True  # type: ignore[attr-defined]
    cls._get_prompt_logprobs_dict = prompt_logprobs
    status[_V1] = True


# --- V2 model runner -------------------------------------------------------------------------


def _v2_chunking(segments: list[tuple[int, int, int, int, int]], topk_scores: Callable[..., Any], chunk_size: int,
                 prompt_token_ids: torch.Tensor, prompt_hidden_states: torch.Tensor, logits_fn: Callable[[torch.Tensor], torch.Tensor],
                 num_prompt_logprobs: int, logprobs_mode: str = "raw_logprobs") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's ``compute_prompt_logprobs_with_chunking`` whose sampled rows (``segments``:
    flat row range, seed, first prompt row, N) hold the label and N draws."""
    token_ids, scores, ranks = [], [], []
    logits_mode = logprobs_mode in ("raw_logits", "processed_logits")
    prompt_token_ids = prompt_token_ids.to(torch.int64)
    for a in range(0, prompt_token_ids.shape[0], chunk_size):
        b = min(a + chunk_size, prompt_token_ids.shape[0])
        logits = logits_fn(prompt_hidden_states[a:b])
        requested = logits.shape[-1] if num_prompt_logprobs == -1 else num_prompt_logprobs
        result = topk_scores(logits, requested, prompt_token_ids[a:b], logits_mode=logits_mode)
        ids, lps, rk = result.logprob_token_ids, result.logprobs, result.selected_token_ranks
        for lo, hi, seed, first, n in segments:
            r0, r1 = max(lo, a), min(hi, b)
            if r0 >= r1:
                continue
            d_ids, d_lps = drawn_rows(logits[r0 - a : r1 - a], prompt_token_ids[r0:r1], seed, first + r0 - lo, n)
            ids[r0 - a : r1 - a, : n + 1] = d_ids.to(ids.dtype)
            lps[r0 - a : r1 - a, : n + 1] = d_lps.to(lps.dtype)
            rk[r0 - a : r1 - a] = DRAWN_RANK
        token_ids.append(ids)
        scores.append(lps)
        ranks.append(rk)
    cat = (lambda xs: torch.cat(xs, dim=0) if len(xs) > 1 else xs[0])
    return cat(token_ids), cat(scores), cat(ranks)


def _patch_v2(module: Any) -> None:
    cls = getattr(module, "PromptLogprobsWorker", None)
    needed = ("add_request", "remove_request", "compute_prompt_logprobs")
    if cls is None or not all(hasattr(cls, m) for m in needed) or not hasattr(module, "compute_prompt_logprobs_with_chunking") \
            or not hasattr(module, "compute_topk_scores"):
        status[_V2] = "PromptLogprobsWorker or its chunked top-k is missing"
        return
    if getattr(cls.compute_prompt_logprobs, "_hpd_sampling", False):
        status[_V2] = True
        return
    add, remove, compute = cls.add_request, cls.remove_request, cls.compute_prompt_logprobs

    @functools.wraps(add)
    def add_request(self: Any, req_id: str, req_idx: int, sampling_params: Any) -> None:
        add(self, req_id, req_idx, sampling_params)
        seed = _seed_of(sampling_params)
        if seed is not None and sampling_params.prompt_logprobs:
            self.__dict__.setdefault("_hpd_seeds", {})[req_id] = (int(seed), int(sampling_params.prompt_logprobs))

    @functools.wraps(remove)
    def remove_request(self: Any, req_id: str) -> None:
        remove(self, req_id)
        self.__dict__.get("_hpd_seeds", {}).pop(req_id, None)

    @functools.wraps(compute)
    def compute_prompt_logprobs(self: Any, logits_fn: Any, hidden_states: torch.Tensor, input_batch: Any, *args: Any, **kwargs: Any) -> Any:
        seeds = self.__dict__.get("_hpd_seeds")
        segments = []
        if seeds:
            starts = input_batch.query_start_loc_np
            for i, req_id in enumerate(input_batch.req_ids):
                if req_id in seeds:
                    seed, n = seeds[req_id]
                    segments.append((int(starts[i]), int(starts[i + 1]), seed, int(input_batch.num_computed_prefill_tokens_np[i]), n))
        if not segments:
            return compute(self, logits_fn, hidden_states, input_batch, *args, **kwargs)
        chunking = module.compute_prompt_logprobs_with_chunking
        module.compute_prompt_logprobs_with_chunking = functools.partial(_v2_chunking, segments, module.compute_topk_scores,
                                                                         int(getattr(module, "CHUNK_SIZE", ROWS)))
        try:
            return compute(self, logits_fn, hidden_states, input_batch, *args, **kwargs)
        finally:
            module.compute_prompt_logprobs_with_chunking = chunking

    compute_prompt_logprobs._hpd_sampling = True  # type: ignore[attr-defined]
    cls.add_request, cls.remove_request, cls.compute_prompt_logprobs = add_request, remove_request, compute_prompt_logprobs
    status[_V2] = True


# --- installation ----------------------------------------------------------------------------

_PATCHES = {_V1: _patch_v1, _V2: _patch_v2}


class _PatchingLoader(importlib.abc.Loader):
    """Runs a module's own loader, then patches the module."""

    def __init__(self, loader: Any, patch: Callable[[Any], None]):
        self._loader, self._patch = loader, patch

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, ... of the real loader
        return getattr(self._loader, name)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        patch = _PATCHES.get(name)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchingLoader(spec.loader, patch)
        return spec


def install() -> None:
    """Patch vLLM's model runners in this process: now where imported, else when imported."""
    for name, patch in _PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def register() -> None:
    """The ``vllm.general_plugins`` entry point: vLLM calls it in each of its processes."""
    install()


def missing() -> str | None:
    """Why the hooks cannot work in this process's vLLM: the reasons when every runner
    module imported here lacks what its hook needs; None otherwise (the host's check of
    the returned ranks, :data:`DRAWN_RANK`, is the definitive one)."""
    seen = [status[name] for name in _PATCHES if name in status]
    if not seen or any(s is True for s in seen):
        return None
    return "; ".join(str(s) for s in seen)
