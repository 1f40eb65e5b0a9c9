"""Cache stage throughput against vLLM's pure prefill and transformers forward + top-k.

    python benchmarks/cache_throughput.py [--teacher smollm2-135m-instruct]
        [--data data/instructions/train.jsonl] [--k 64] [--repeats 2]

All rows use the same token sequences (the data, tokenised as the cache stage
does) and, for the vLLM rows, one engine:

- vLLM prefill: ``SamplingParams(max_tokens=1)``, no log-probs: the floor
  cost of reading the prompts.
- vLLM prompt_logprobs, public output: ``prompt_logprobs=k`` read through
  vLLM's FlatLogprobs (what a script using vLLM's API gets).
- cache stage: ``build_cache`` end to end on that engine (scoring, the
  companded code, LZMA, Zarr writes, markers), counted over the tokens it
  scored, and the scoring part of it alone.
- transformers: forward + log_softmax + top-k in batches (the hf engine).

Each row is timed ``--repeats`` times and the best run is kept (the machine is
shared; the best run is the least disturbed). Ratios are against prefill.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def lm_head_share(config: dict) -> float:
    """Fraction of a full forward pass's FLOPs spent in the LM head (logits at every
    position), which pure prefill skips for all but the last position."""
    h, v, layers = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    inter = config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or h // heads
    per_layer = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h + 3 * h * inter
    return v * h / (layers * per_layer + v * h)


def best_of(repeats: int, fn) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="data/instructions/train.jsonl")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()

    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    import logging

    logging.basicConfig(level=logging.WARNING)
    from transformers import AutoTokenizer

    from hpd_tools.cache import CacheConfig, build_cache
    from hpd_tools.data import read_examples
    from hpd_tools.engines.hf import HFTeacher
    from hpd_tools.engines.vllm import VLLMTeacher, _from_flat
    from hpd_tools.models import resolve_teacher

    teacher_dir = resolve_teacher(args.teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    examples, _ = read_examples(args.data, tokenizer, max_length=args.max_length)
    seqs = [e.tokens for e in examples]
    n_tokens = sum(len(s) for s in seqs)
    print(f"{len(seqs)} sequences, {n_tokens} tokens, k={args.k}, teacher {teacher_dir}", file=sys.stderr)

    engine = VLLMTeacher(teacher_dir, k=args.k, max_length=args.max_length)
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=s.tolist()) for s in seqs]
    engine.llm.generate(prompts[:8], SamplingParams(max_tokens=1), use_tqdm=False)  # warm-up
    rows = []

    t, _ = best_of(args.repeats, lambda: engine.llm.generate(prompts, SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False))
    prefill = n_tokens / t
    rows.append(("vLLM prefill (max_tokens=1, no logprobs)", prefill))

    def public() -> None:
        params = SamplingParams(max_tokens=1, prompt_logprobs=args.k, flat_logprobs=True, detokenize=False)
        engine.tensor_logprobs, saved = False, engine.tensor_logprobs
        try:
            for out in engine.llm.generate(prompts, params, use_tqdm=False):
                _from_flat(out.prompt_logprobs, args.k)
        finally:
            engine.tensor_logprobs = saved

    t, _ = best_of(args.repeats, public)
    rows.append((f"vLLM prompt_logprobs={args.k}, public FlatLogprobs output", n_tokens / t))

    def cache_stage():
        with tempfile.TemporaryDirectory() as tmp:
            config = CacheConfig(teacher=teacher_dir, data=args.data, top_k=args.k, max_length=args.max_length, out=str(Path(tmp) / "c"), reuse=False)
            return build_cache(config, teacher=engine)

    t, result = best_of(args.repeats, cache_stage)
    rows.append(("cache stage, end to end (build_cache)", result.tokens_scored / t))
    rows.append(("cache stage, teacher scoring only", result.tokens_scored / result.score_seconds))
    engine.close()

    hf = HFTeacher(teacher_dir, batch_tokens=4096)
    t, _ = best_of(args.repeats, lambda: hf.score(seqs, args.k))
    rows.append((f"transformers forward + top-{args.k} (hf engine)", n_tokens / t))

    share = lm_head_share(json.loads((Path(teacher_dir) / "config.json").read_text()))
    print(f"\n{'path':<52} {'tokens/s':>9} {'x prefill':>9}")
    for name, rate in rows:
        print(f"{name:<52} {rate:>9,.0f} {rate / prefill:>9.2f}")
    print(f"\nLM head share of a full forward pass for this teacher: {share:.0%}. Prefill computes logits for the")
    print(f"last position only; log-probs need them at every position, which alone bounds the ratio at ~{1 - share:.2f}x")
    print("before the log-softmax and top-k over the vocabulary.")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "tokens": n_tokens, "lm_head_share": share}, indent=2))
    sys.stdout.flush()
    os._exit(0)  # vLLM may abort during interpreter teardown


if __name__ == "__main__":
    main()
