"""Peak memory of the chunked distillation loss against a naive full-tensor loss.

    python benchmarks/loss_memory.py [--tokens 1024 2048 4096 8192 16384]
        [--losses hpd fkl] [--k 64] [--chunk 1024] [--json out.json]

The model is just an LM head, ``torch.nn.Linear(576, 49152, bias=False)``
(SmolLM2-135M's hidden size and vocabulary), on top of random hidden states
[tokens, 576] that require grad, with random teacher targets (top-k ids and
sorted log-probs, a label log-prob, sampling noise). Per loss and batch size
two ways of computing the loss, forward + backward, are measured:

- naive: ``logits = head(hidden)`` for all tokens at once, then the loss from
  ``hpd_tools.losses`` on the whole [tokens, vocab] tensor, then backward;
- chunked: ``hpd_tools.distill.chunked_loss`` (``loss_chunk_tokens`` rows at a
  time, each chunk checkpointed and recomputed in backward), then backward.

Each measurement runs in its own subprocess (this script re-invoked with
``--worker``), so one run's allocator state cannot hide another's. In the
worker, after setup (model, inputs, targets), the kernel's peak-RSS mark is
reset (``/proc/self/clear_refs`` = 5) and the current RSS taken as the
baseline; the reported peak is VmHWM after forward + backward minus that
baseline, i.e. the memory the loss itself needed, including the head's weight
gradient (576 x 49152 float32 = 113 MB in both columns). Where the reset is
not allowed it falls back to ``ru_maxrss`` minus the RSS after setup.

The default run takes ~6-10 minutes on 2 CPU cores (the naive 16384-token
cells hold ~15 GB; a naive cell that would not fit in the memory available is
skipped and shown as "skip").

The goal reported against: the chunked peak flat in batch tokens and at most
0.5x the naive peak at 8192 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HIDDEN = 576
VOCAB = 49152


# -- worker: one measurement ---------------------------------------------------

def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(mode: str, loss: str, tokens: int, k: int, chunk: int, threads: int) -> dict:
    import resource

    import torch

    from hpd_tools.distill import DistillConfig, chunked_loss
    from hpd_tools.losses import Targets, compute_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)

        def get_output_embeddings(self) -> torch.nn.Module:
            return self.lm_head

    model = Head()
    hidden = torch.randn(tokens, HIDDEN, requires_grad=True)
    # Teacher targets: k distinct-enough random ids (collisions are ~k^2/V rare and
    # harmless), log-probs sorted descending holding ~90% of the mass.
    topk_ids = torch.randint(0, VOCAB, (tokens, k))
    topk_lp = (torch.log_softmax(torch.randn(tokens, k) * 2, dim=-1) + torch.log(torch.tensor(0.9))).sort(dim=-1, descending=True).values
    labels = topk_ids[:, 0].clone()
    targets = Targets(
        labels=labels,
        mask=torch.ones(tokens, dtype=torch.bool),
        label_logprob=topk_lp[:, 0].clone(),
        topk_ids=topk_ids,
        topk_logprobs=topk_lp,
        noise=torch.rand(tokens),
    )
    config = DistillConfig(caches=["-"], student="-", out="-", loss=loss, loss_chunk_tokens=chunk)

    reset = _reset_peak()
    base_kb = _status_kb("VmRSS")
    base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if mode == "naive":
        logits = model.get_output_embeddings()(hidden)
        total = compute_loss(loss, logits, targets).loss_sum
    else:
        total, _ = chunked_loss(model, hidden, targets, config)
    (total / tokens).backward()
    seconds = time.perf_counter() - start
    if reset:
        peak_kb = _status_kb("VmHWM")
    else:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        base_kb = max(base_kb, base_maxrss)  # setup's own peak hides anything below it
    assert hidden.grad is not None and model.lm_head.weight.grad is not None
    return {
        "mode": mode,
        "loss": loss,
        "tokens": tokens,
        "peak_mb": (peak_kb - base_kb) / 1024,
        "seconds": seconds,
        "loss_value": float(total) / tokens,
        "method": "VmHWM after clear_refs" if reset else "ru_maxrss",
    }


# -- driver ------------------------------------------------------------------------

def naive_fits(tokens: int) -> bool:
    """The naive loss holds ~5 [tokens, vocab] float32 tensors at its peak (measured);
    skip it where that, plus 1 GB, exceeds 90% of the memory available now."""
    import psutil

    need = 5 * tokens * VOCAB * 4 + 2**30
    return need <= 0.9 * psutil.virtual_memory().available


def measure(mode: str, loss: str, tokens: int, args: argparse.Namespace) -> dict:
    if mode == "naive" and not naive_fits(tokens):
        return {"mode": mode, "loss": loss, "tokens": tokens, "peak_mb": None, "seconds": None, "error": "skipped: would not fit in available memory"}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--losses", loss, "--tokens", str(tokens),
           "--k", str(args.k), "--chunk", str(args.chunk), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return {"mode": mode, "loss": loss, "tokens": tokens, "peak_mb": None, "seconds": None, "error": f"exit {proc.returncode}: {tail[0]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--losses", nargs="+", default=["hpd", "fkl"])
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=1024, help="loss_chunk_tokens of the chunked loss")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0)) or (os.cpu_count() or 1))
    parser.add_argument("--worker", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, args.losses[0], args.tokens[0], args.k, args.chunk, args.threads)))
        return

    wall = time.perf_counter()
    rows = []
    for loss in args.losses:
        for tokens in args.tokens:
            naive = measure("naive", loss, tokens, args)
            chunked = measure("chunked", loss, tokens, args)
            rows.append((loss, tokens, naive, chunked))
            note = "; ".join(c["error"] for c in (naive, chunked) if c.get("error"))
            cells = ", ".join(f"{c['mode']} {c['peak_mb']:,.0f} MB in {c['seconds']:.1f} s" for c in (naive, chunked) if c.get("peak_mb") is not None)
            print(f"  {loss} {tokens} tokens: {cells}{'  (' + note + ')' if note else ''}", file=sys.stderr, flush=True)

    sys.stderr.flush()
    print(f"\nLM head {HIDDEN} -> {VOCAB}, k={args.k}, loss_chunk_tokens={args.chunk}, forward + backward, {args.threads} threads;")
    print("peak = resident memory growth over the post-setup baseline, one subprocess per cell\n")
    header = f"{'loss':<5} {'batch tokens':>12} {'naive MB':>9} {'chunked MB':>10} {'ratio':>6} {'naive s':>8} {'chunked s':>9}"
    print(header)
    print("-" * len(header))

    def fmt(value: float | None, spec: str, width: int, cell: dict | None = None) -> str:
        if value is not None:
            return f"{value:{width}{spec}}"
        missing = "skip" if cell is not None and cell.get("error", "").startswith("skipped") else "-" if cell is None else "fail"
        return f"{missing:>{width}}"

    verdicts = []
    for loss, tokens, naive, chunked in rows:
        ratio = chunked["peak_mb"] / naive["peak_mb"] if naive["peak_mb"] and chunked["peak_mb"] is not None else None
        print(f"{loss:<5} {tokens:>12} {fmt(naive['peak_mb'], ',.0f', 9, naive)} {fmt(chunked['peak_mb'], ',.0f', 10, chunked)} {fmt(ratio, '.2f', 6)} "
              f"{fmt(naive['seconds'], '.2f', 8, naive)} {fmt(chunked['seconds'], '.2f', 9, chunked)}")
    for loss in args.losses:
        mine = [r for r in rows if r[0] == loss and r[3]["peak_mb"] is not None]
        if not mine:
            continue
        peaks = [r[3]["peak_mb"] for r in mine]
        spread = max(peaks) / min(peaks)
        at8k = [r for r in mine if r[1] == 8192 and r[2]["peak_mb"]]
        ratio8k = at8k[0][3]["peak_mb"] / at8k[0][2]["peak_mb"] if at8k else None
        flat = spread <= 1.25
        verdicts.append(
            f"{loss}: chunked peak {min(peaks):,.0f}-{max(peaks):,.0f} MB over {mine[0][1]}-{mine[-1][1]} tokens "
            f"(max/min {spread:.2f}, {'flat' if flat else 'NOT flat'}, goal <= 1.25); "
            + (f"at 8192 tokens {ratio8k:.2f}x naive ({'meets' if ratio8k <= 0.5 else 'MISSES'} goal <= 0.5x)" if ratio8k is not None else "no 8192-token row")
        )
    print()
    for line in verdicts:
        print(line)
    failures = [f"{r[0]} {r[1]} {c['mode']}: {c['error']}" for r in rows for c in (r[2], r[3]) if c.get("error")]
    for line in failures:
        print("failed:", line)
    print(f"\nwall time {time.perf_counter() - wall:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": [{"loss": l, "tokens": t, "naive": n, "chunked": c} for l, t, n, c in rows], "k": args.k, "chunk": args.chunk}, indent=2))


if __name__ == "__main__":
    main()
