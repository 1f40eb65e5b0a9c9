"""Training-step throughput: HPD from a teacher cache against plain SFT and an online teacher.

    HPD_CACHE_HOME=... python benchmarks/distill_throughput.py
        [--teacher smollm2-135m-instruct] [--data data/instructions/train.jsonl]
        [--cache DIR] [--keep-layers 0 6 12 18 24 29] [--batch-tokens 2048]
        [--steps 3] [--warmup 2] [--repeats 2] [--losses hpd] [--json out.json]

One run, one student, one sequence of batches, rows:

- ``<loss> from cache``: ``hpd_tools.distill.micro_step`` (the training loop's
  forward + chunked loss + backward) on batches streamed from the cache by
  ``CacheStream``, then gradient clipping and an AdamW step, as ``train`` does.
  The stream's reading and decoding is inside the timed step.
- ``sft from cache``: the same with loss ``sft`` (same model, same batches):
  the baseline, a step with no teacher at all.
- ``<loss>, online teacher``: what a trainer without a cache does: each step the
  teacher (transformers, float32, no grad) runs forward on the batch and its
  log-probs give the top-k and the label's log-prob, which replace the cached
  ones in the batch; then the same ``micro_step`` + AdamW. The teacher computes
  its LM head only at the trained (response) positions, chunked like the
  student's loss, the cheapest an online trainer can do, so the teacher share
  printed is a lower bound. Its batches are the cache's batches read before the
  timing (an online trainer holds tokenised data, not a cache).

The cache is built once (``build_cache``, engine ``hf``, top-k 64, no reuse of
other caches' rows) into ``--cache`` when that folder does not hold it yet. The
student is the teacher depth-pruned to ``--keep-layers`` (same tokenizer). Each
row starts from the same pruned weights and fresh AdamW (float32), runs
``--warmup`` steps, then times ``--steps`` steps ``--repeats`` times over the
same batches and keeps the best repeat (the machine is shared; the repeats
are interleaved across rows, so a burst of outside load spoils one pass of
every row rather than a whole row). Tokens/s
counts the batches' real (unpadded) tokens.

The default run takes ~2 minutes on 2 idle CPU cores (plus ~1-3 minutes the
first time, to build the cache). CPU timings are very sensitive to other
processes: with 2 busy threads from elsewhere on a 2-core machine every row
slows ~4x (OpenMP oversubscription), hence the interleaved best-of.

Goals reported against: HPD >= 0.9x SFT, and HPD faster than the online step by
at least the teacher's share, i.e. HPD step time <= online step time x (1 -
teacher forward time / online step time).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def prune(model, keep: list[int]):
    """Keep decoder layers ``keep`` of a Llama-style model, renumbered 0.. for the KV cache."""
    import torch

    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model


class OnlineTeacher:
    """Teacher top-k / label log-probs for a batch, computed now (the no-cache way)."""

    def __init__(self, model, k: int, chunk: int):
        self.model, self.k, self.chunk = model, k, chunk
        self.seconds = 0.0

    def fill(self, batch, device):
        """``batch`` with its teacher fields recomputed by a forward pass."""
        import numpy as np
        import torch

        start = time.perf_counter()
        with torch.inference_mode():
            ids = torch.from_numpy(batch.input_ids).to(device)
            attn = torch.zeros_like(ids)
            for i, n in enumerate(batch.lengths):
                attn[i, :n] = 1
            mask = torch.from_numpy(batch.loss_mask).to(device)
            hidden = self.model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state[mask]
            labels = torch.zeros_like(ids)
            labels[:, :-1] = ids[:, 1:]
            labels = labels[mask]
            head = self.model.get_output_embeddings()
            top_lp, top_ids, label_lp = [], [], []
            for a in range(0, hidden.shape[0], self.chunk):
                lp = torch.log_softmax(head(hidden[a : a + self.chunk]).float(), dim=-1)
                v, i = lp.topk(self.k, dim=-1)
                top_lp.append(v)
                top_ids.append(i)
                label_lp.append(lp.gather(-1, labels[a : a + self.chunk, None]).squeeze(-1))
            m = batch.loss_mask
            topk_ids = np.zeros_like(batch.topk_ids)
            topk_logprobs = np.zeros_like(batch.topk_logprobs)
            label_logprob = np.zeros_like(batch.label_logprob)
            topk_ids[m] = torch.cat(top_ids).cpu().numpy()
            topk_logprobs[m] = torch.cat(top_lp).cpu().numpy()
            label_logprob[m] = torch.cat(label_lp).cpu().numpy()
        self.seconds += time.perf_counter() - start
        return replace(batch, topk_ids=topk_ids, topk_logprobs=topk_logprobs, label_logprob=label_logprob)


class Row:
    """One kind of step: its own copy of the student, AdamW, noise generator and batches.

    ``batches_for(phase)`` yields the batches: phase "warmup", or "timed" (the
    same timed batches, from the same starting point, on every pass).
    """

    def __init__(self, name, base_student, loss, batches_for, teacher, args, device):
        import torch

        from hpd_tools.distill import DistillConfig

        self.name, self.loss, self.batches_for, self.teacher, self.device = name, loss, batches_for, teacher, device
        self.model = copy.deepcopy(base_student).to(device).train()
        self.config = DistillConfig(caches=["-"], student="-", out="-", loss=loss, batch_tokens=args.batch_tokens, loss_chunk_tokens=args.chunk)
        c = self.config
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=c.lr, betas=c.betas, weight_decay=c.weight_decay)
        self.noise_gen = torch.Generator().manual_seed(0)
        self.best = None

    def step(self, batch) -> int:
        """One optimizer step as ``train`` does it (grad_accum 1); returns the batch's real tokens."""
        import torch

        from hpd_tools.distill import micro_step

        if self.teacher is not None:
            batch = self.teacher.fill(batch, self.device)
        n_active = int(batch.loss_mask.sum())
        micro_step(self.model, batch, self.noise_gen, self.config, self.device, 1.0 / n_active)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return batch.n_tokens

    def warmup(self) -> None:
        for batch in self.batches_for("warmup"):
            self.step(batch)

    def timed_pass(self, steps: int) -> None:
        if self.teacher is not None:
            self.teacher.seconds = 0.0
        tokens, start = 0, time.perf_counter()
        for batch in self.batches_for("timed"):  # the stream's reads are inside the timing
            tokens += self.step(batch)
        seconds = time.perf_counter() - start
        teacher_s = self.teacher.seconds if self.teacher is not None else 0.0
        print(f"  {self.name}: {tokens} tokens in {seconds:.2f} s ({tokens / seconds:,.0f} tokens/s)", file=sys.stderr, flush=True)
        if self.best is None or seconds < self.best["seconds"]:
            self.best = {"row": self.name, "loss": self.loss, "tokens": tokens, "seconds": seconds, "teacher_seconds": teacher_s,
                         "tokens_per_s": tokens / seconds, "step_seconds": seconds / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="data/instructions/train.jsonl")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "hpd-distill-throughput-cache"), help="cache folder, built here if absent")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--keep-layers", type=int, nargs="+", default=[0, 6, 12, 18, 24, 29])
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=1024, help="loss_chunk_tokens")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per repeat")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--losses", nargs="+", default=["hpd"], help="distillation losses to compare (each gets a cache row and an online row)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--round-prompts", type=int, default=8, help="prompts in the timed on-policy round (0: skip it)")
    parser.add_argument("--round-new-tokens", type=int, default=64)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING)
    import torch
    from transformers import AutoModelForCausalLM

    from hpd_tools import CacheConfig, build_cache
    from hpd_tools.distill import check_caches, load_student
    from hpd_tools.models import resolve_teacher
    from hpd_tools.stream import CacheStream, Prefetcher

    if args.threads:
        torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher_dir = resolve_teacher(args.teacher)

    cache = Path(args.cache)
    t0 = time.perf_counter()
    result = build_cache(CacheConfig(teacher=teacher_dir, data=args.data, engine="hf", top_k=args.k, out=str(cache), reuse=False))
    how = "found complete" if result.already_complete else f"built in {time.perf_counter() - t0:.0f} s ({result.tokens_scored / max(result.score_seconds, 1e-9):,.0f} tokens/s scoring)"
    print(f"cache {cache}: {result.sequences} sequences, {result.tokens} tokens, {how}", file=sys.stderr, flush=True)

    teacher_model, tokenizer = load_student(teacher_dir)  # float32 HF model + tokenizer
    check_caches([str(cache)], tokenizer)
    student = prune(AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32), args.keep_layers)
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher_model.parameters())
    teacher_model.to(device).eval().requires_grad_(False)

    def stream_batches():
        """Warm-up batches, then the same timed batches each time (the stream's
        position after the warm-up is restored before every timed pass)."""
        stream = CacheStream([str(cache)], batch_tokens=args.batch_tokens, seed=0)
        after_warmup: dict = {}

        def batches_for(phase):
            if phase == "warmup":
                for _ in range(args.warmup):
                    yield stream.next_batch()
                after_warmup["state"] = stream.state()
            else:
                # As train() does: the next batch is read while the current one trains.
                stream.load_state(after_warmup["state"])
                ahead = Prefetcher(stream)
                try:
                    for _ in range(args.steps):
                        yield ahead.next_batch()
                finally:
                    ahead.close()

        return batches_for

    # The online rows' batches: the same ones, read up front (token ids only matter).
    stream = CacheStream([str(cache)], batch_tokens=args.batch_tokens, seed=0)
    t0 = time.perf_counter()
    pre = [stream.next_batch() for _ in range(args.warmup + args.steps)]
    read_s = (time.perf_counter() - t0) / len(pre)

    def preloaded(phase):
        return iter(pre[: args.warmup] if phase == "warmup" else pre[args.warmup :])

    timed = pre[args.warmup :]
    real = sum(b.n_tokens for b in timed)
    padded = sum(b.input_ids.size for b in timed)
    response = sum(int(b.loss_mask.sum()) for b in timed)
    print(
        f"student: layers {args.keep_layers} of {teacher_model.config.num_hidden_layers}, {n_student / 1e6:.1f}M params; teacher {n_teacher / 1e6:.1f}M; "
        f"timed batches: {args.steps} x ~{real // args.steps} real tokens ({padded // args.steps} padded, {response // args.steps} trained), "
        f"device {device}, {torch.get_num_threads()} threads",
        file=sys.stderr,
        flush=True,
    )

    runs = [Row(f"{loss} from cache", student, loss, stream_batches(), None, args, device) for loss in args.losses]
    runs.append(Row("sft from cache", student, "sft", stream_batches(), None, args, device))
    runs += [Row(f"{loss}, online teacher", student, loss, preloaded, OnlineTeacher(teacher_model, args.k, args.chunk), args, device) for loss in args.losses]
    for run in runs:
        run.warmup()
    # Repeats interleaved across rows, so a burst of load from other processes on
    # the machine hits one pass of every row rather than all passes of one row.
    for _ in range(args.repeats):
        for run in runs:
            run.timed_pass(args.steps)
    rows = [run.best for run in runs]

    by = {r["row"]: r for r in rows}
    sft = by["sft from cache"]
    print(f"\nstudent {len(args.keep_layers)}/{teacher_model.config.num_hidden_layers} layers, batch_tokens {args.batch_tokens}, k={args.k}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, best of {args.repeats}, {torch.get_num_threads()} threads, {device}")
    print(f"tokens = real (unpadded) tokens: {real // args.steps} per step on average ({response // args.steps} trained, {padded // args.steps} padded)\n")
    header = f"{'step':<26} {'tokens/s':>9} {'s/step':>7} {'x sft':>6} {'teacher s/step':>15}"
    print(header)
    print("-" * len(header))
    for r in rows:
        teach = f"{r['teacher_seconds'] / args.steps:15.2f}" if r["teacher_seconds"] else f"{'':>15}"
        print(f"{r['row']:<26} {r['tokens_per_s']:>9,.0f} {r['step_seconds']:>7.2f} {r['tokens_per_s'] / sft['tokens_per_s']:>6.2f} {teach}")
    print(f"\ncache read + decode (CacheStream.next_batch): {read_s * 1000:.0f} ms per batch, inside the 'from cache' rows")

    print()
    summary = {}
    for loss in args.losses:
        cached, online = by[f"{loss} from cache"], by[f"{loss}, online teacher"]
        vs_sft = cached["tokens_per_s"] / sft["tokens_per_s"]
        vs_online = cached["tokens_per_s"] / online["tokens_per_s"]
        share = online["teacher_seconds"] / online["seconds"]
        bound = online["step_seconds"] * (1 - share)  # the online step without its teacher
        needed = 1 / (1 - share)
        print(f"{loss}/sft    = {vs_sft:.2f}x   (goal >= 0.90x: {'met' if vs_sft >= 0.9 else 'MISSED'})")
        print(f"{loss}/online = {vs_online:.2f}x   teacher share of the online step = {share:.0%} "
              f"(teacher forward {online['teacher_seconds'] / args.steps:.2f} s of {online['step_seconds']:.2f} s/step); "
              f"goal >= {needed:.2f}x, i.e. step <= {bound:.2f} s: {'met' if cached['step_seconds'] <= bound else 'MISSED'} ({cached['step_seconds']:.2f} s)")
        gap = cached["step_seconds"] - bound
        print(f"{'':<15}{loss} step - (online step - teacher) = {gap:+.2f} s/step; the cache read alone is {read_s:.2f} s/batch, so beyond the "
              f"teacher's share the two differ only by that read and noise")
        summary[loss] = {"vs_sft": vs_sft, "vs_online": vs_online, "teacher_share": share, "needed_vs_online": needed}
    round_cost = None
    if args.round_prompts:
        round_cost = onpolicy_round_cost(student, teacher_dir, cache, args, by["hpd from cache"] if "hpd from cache" in by else rows[0])
    print(f"\nwall time {time.perf_counter() - wall:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary, "cache_read_s_per_batch": read_s, "onpolicy_round": round_cost, "args": vars(args)}, indent=2))


def onpolicy_round_cost(student, teacher_dir: str, cache: Path, args, step_row: dict) -> dict:
    """One on-policy round (student generate + online teacher scoring, transformers
    engine in-process) against a training step, per 1k tokens, so a user can pick
    --sample-every: a round every N steps adds (round seconds / N) to each step."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoTokenizer

    from hpd_tools.onpolicy import OnPolicy

    cfg = SimpleNamespace(seed=0, onpolicy_buffer=args.round_prompts, sample_prompts=args.round_prompts, sample_max_new_tokens=args.round_new_tokens,
                          sample_temperature=1.0, online_teacher=teacher_dir, online_engine="hf", online_engine_args={})
    op = OnPolicy(cfg, AutoTokenizer.from_pretrained(teacher_dir), str(cache), k=args.k, max_length=2048)
    op.round(student, torch.device("cpu"))  # warm-up: loads the online teacher
    m = op.round(student, torch.device("cpu"))
    op.close()
    generated = m["onpolicy/mean_length"] * args.round_prompts
    scored = m["onpolicy/score_tokens_per_s"] * m["onpolicy/score_seconds"]
    round_s = m["onpolicy/sample_seconds"] + m["onpolicy/score_seconds"]
    step_per_1k = 1000 / step_row["tokens_per_s"]
    out = {"prompts": args.round_prompts, "generated_tokens": generated, "scored_tokens": scored, "sample_s": m["onpolicy/sample_seconds"],
           "score_s": m["onpolicy/score_seconds"], "round_s": round_s, "sample_s_per_1k_generated": 1000 * m["onpolicy/sample_seconds"] / max(generated, 1),
           "score_s_per_1k_scored": 1000 * m["onpolicy/score_seconds"] / max(scored, 1), "train_step_s_per_1k": step_per_1k,
           "train_step_s": step_row["step_seconds"]}
    print(f"\non-policy round ({args.round_prompts} prompts, {generated:.0f} generated tokens, {scored:.0f} scored): "
          f"{round_s:.1f} s = sampling {out['sample_s']:.1f} s ({out['sample_s_per_1k_generated']:.1f} s per 1k generated tokens) + "
          f"scoring {out['score_s']:.1f} s ({out['score_s_per_1k_scored']:.2f} s per 1k scored tokens); "
          f"a training step: {step_row['step_seconds']:.2f} s ({step_per_1k:.2f} s per 1k tokens). "
          f"One round costs {round_s / step_row['step_seconds']:.1f} steps: --sample-every N adds {100 * round_s / step_row['step_seconds']:.0f}/N % to training time.")
    return out


if __name__ == "__main__":
    main()
