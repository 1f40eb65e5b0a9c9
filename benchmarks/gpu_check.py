"""The GPU check: distill throughput and MFU, chunked-loss memory, y' agreement,
the hf cache engine, and a resume check, on one GPU in a few minutes.

    python benchmarks/gpu_check.py [--json out.json] [--keep DIR] [--peak-tflops N]
    python benchmarks/gpu_check.py --tiny        # small shapes, a few steps: the CPU proof

Needs only torch and transformers from the machine, this tree (``PYTHONPATH=.``)
and the small wheels hpd-tools imports (zarr, numcodecs, google-crc32c, donfig;
click, pyyaml, fsspec and packaging where missing): no vLLM (its CUDA wheel is
too large to carry), nothing downloaded. docs/performance.md, "The GPU check", says how to
bring the wheels to an offline GPU machine.

Models are randomly initialised llama models of real shapes built from a
``LlamaConfig``: the student is Qwen2.5-0.5B-like (24 layers, hidden 896, 14
heads of 64, 2 KV heads, MLP 4864, vocabulary 151,936, tied embeddings: 494M
parameters), the teacher the same shape with other weights. A byte-level BPE
trained on the bundled prompts (``data/instructions``) is the tokenizer (the
models' embeddings are wider than it, as padded vocabularies are); the data are
multi-turn conversations stitched from the bundled records. Steps, in order:

1. build_cache with the hf engine (bf16 on the GPU) over that data (k=64);
2. the hf engine's scoring tokens/s against a bare forward + log_softmax +
   top-k over the same batches (the engine before chunking), with peak memory;
3. distill steps (``hpd_tools.distill.micro_step`` + clipping + AdamW, the
   loop's work per step) for sft, fkl and hpd under bf16 autocast at 8k, 16k
   and 32k batch tokens: tokens/s, MFU (6 x parameters x tokens/s over the
   GPU's dense bf16 peak), peak memory; HPD/SFT ratio;
4. the chunked loss alone (``chunked_loss`` on random hidden states of each
   batch's response rows, forward + backward): peak memory above its inputs;
5. y' agreement, over a few HPD steps at the middle batch size: per chunk, the
   y' drawn in the forward pass against (a) the y' the checkpointed
   recomputation in backward trains (the kept draw, or a second draw where the
   code samples again) and (b) a fresh draw from the recomputed logits with the
   same noise (how often resampling would flip y' on this GPU);
6. resume: ``train`` 20 HPD steps straight, and the same run resumed from its
   step-10 checkpoint in a fresh folder; the losses of steps 11-20 compared
   (a 2-layer student of the same vocabulary, to keep checkpoints small).

Prints markdown tables (and writes ``--json``). ``--tiny``: 2-layer models of
hidden 64, 2k vocabulary, 512-2k batch tokens, 1+2 steps; on a CPU it takes
about a minute or two and proves the script, not the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN05 = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
              head_dim=64, vocab_size=151_936, tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=1e6)
SHAPES = {
    "real": dict(student=QWEN05, teacher=QWEN05, resume=dict(QWEN05, num_hidden_layers=2, hidden_size=256, intermediate_size=1024,
                                                            num_attention_heads=4, num_key_value_heads=2),
                 tokenizer_vocab=8192, batch_tokens=(8192, 16384, 32768), warmup=2, steps=5, conversations=96, turns=16,
                 max_length=2048, k=64, engine_tokens=65536, resume_batch_tokens=8192, loss_chunk_tokens=1024),
    "tiny": dict(student=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=32, vocab_size=2048, tie_word_embeddings=True, max_position_embeddings=1024),
                 tokenizer_vocab=1024, batch_tokens=(512, 1024, 2048), warmup=1, steps=2, conversations=24, turns=3,
                 max_length=512, k=16, engine_tokens=4096, resume_batch_tokens=512, loss_chunk_tokens=128),
}
SHAPES["tiny"]["teacher"] = SHAPES["tiny"]["student"]
SHAPES["tiny"]["resume"] = SHAPES["tiny"]["student"]
# Dense bf16 tensor-core peaks (no sparsity), by device name; the first match wins.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0), ("H800", 989.0),
                    ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0)]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def fmt(value: float | None, spec: str = ",.0f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


# -- models, tokenizer, data ----------------------------------------------------------

def build_tokenizer(out: Path, vocab: int) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [m["content"] for r in bundled_records() for m in r["messages"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return len(fast)


def build_model(out: Path, shape: dict, tokenizer_dir: Path, seed: int, device: torch.device) -> int:
    """A random llama of ``shape`` saved (bf16 on a GPU, float32 on a CPU) with the tokenizer; returns its parameter count."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, bos_token_id=0, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return n


def bundled_records() -> list[dict]:
    return [json.loads(line) for line in (ROOT / "data" / "instructions" / "train.jsonl").read_text().splitlines() if line.strip()]


def write_conversations(path: Path, n: int, turns: int, seed: int = 0) -> None:
    """Multi-turn chats stitched from the bundled records (user/assistant pairs)."""
    records = bundled_records()
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            messages = []
            for r in rng.sample(records, min(turns, len(records))):
                messages += [m for m in r["messages"] if m["role"] in ("user", "assistant")][-2:]
            f.write(json.dumps({"id": f"conversation-{i}", "messages": messages}) + "\n")


# -- 1-2: the hf engine ----------------------------------------------------------------------

def build_the_cache(work: Path, teacher: Path, data: Path, s: dict) -> tuple[str, dict]:
    from hpd_tools.cache import CacheConfig, build_cache

    t0 = time.time()
    result = build_cache(CacheConfig(teacher=str(teacher), data=str(data), engine="hf", top_k=s["k"], max_length=s["max_length"],
                                     out=str(work / "cache"), batch_tokens=8192, reuse=False))
    summary = result.summary()
    return result.location, {"tokens": result.tokens, "sequences": result.sequences, "seconds": round(time.time() - t0, 1),
                             "score_tokens_per_s": summary["tokens_per_second"], "bytes_per_token": summary["bytes_per_token"]}


def engine_against_bare(teacher: Path, cache: str, s: dict, device: torch.device) -> dict:
    """The hf engine's score() against the plain path it replaced: full logits,
    float32 log_softmax over [batch, length, vocab], top-k, on the same batches."""
    from hpd_tools.cache.reader import CacheReader
    from hpd_tools.engines.hf import HFTeacher

    reader = CacheReader(cache, shuffle=False)
    seqs, total = [], 0
    for i in range(len(reader)):
        seq = reader.read_sequence(i).tokens
        seqs.append(seq)
        total += len(seq)
        if total >= s["engine_tokens"]:
            break
    engine = HFTeacher(str(teacher), batch_tokens=8192)
    k = s["k"]
    engine.score(seqs[:2], k)  # warm-up
    peak_reset(device)
    sync(device)
    t0 = time.perf_counter()
    engine.score(seqs, k)
    sync(device)
    engine_s, engine_peak = time.perf_counter() - t0, peak_gib(device)

    model = engine.model
    peak_reset(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for batch in engine._batches([len(x) for x in seqs]):
            width = len(seqs[batch[0]])
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(batch):
                ids[row, : len(seqs[i])] = torch.from_numpy(seqs[i])
                mask[row, : len(seqs[i])] = 1
            ids, mask = ids.to(engine.input_device), mask.to(engine.input_device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            top = lp.topk(k, dim=-1)
            label = lp.gather(-1, ids[:, 1:, None])
            top.values.cpu(), top.indices.cpu(), label.cpu()
            del logits, lp, top, label
    sync(device)
    bare_s, bare_peak = time.perf_counter() - t0, peak_gib(device)
    engine.close()
    return {"tokens": total, "engine_tokens_per_s": total / engine_s, "engine_peak_gib": engine_peak, "engine_dtype": engine.dtype,
            "bare_tokens_per_s": total / bare_s, "bare_peak_gib": bare_peak}


# -- 3-5: distill -------------------------------------------------------------------------------

def batches_for(cache: str, batch_tokens: int, n: int) -> list:
    from hpd_tools.cache.reader import CacheReader

    reader = CacheReader(cache, seed=0, shuffle=True)
    out: list = []
    epoch = 0
    while len(out) < n:
        out += [b for b in reader.batches(batch_tokens, epoch=epoch) if b.loss_mask.any()]
        epoch += 1
    return out[:n]


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "given"
    if device.type != "cuda":
        return None, "CPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value, name
    return None, name


def distill_rates(student_dir: Path, cache: str, s: dict, device: torch.device, peak: float | None, work: Path) -> tuple[list[dict], dict]:
    """Training steps as distill runs them, per loss and batch size; then y' agreement."""
    from hpd_tools.distill import DistillConfig, load_student, micro_step

    model, _ = load_student(str(student_dir))
    model.to(device).train()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    rows = []
    n = s["warmup"] + s["steps"]
    plans = {bt: batches_for(cache, bt, n) for bt in s["batch_tokens"]}
    for loss in ("sft", "fkl", "hpd"):
        for bt in s["batch_tokens"]:
            config = DistillConfig(caches=[cache], student=str(student_dir), out=str(work / "unused"), loss=loss, batch_tokens=bt, dtype="bfloat16", loss_chunk_tokens=s["loss_chunk_tokens"])
            peak_reset(device)
            tokens, t0 = 0, None
            for i, batch in enumerate(plans[bt]):
                if i == s["warmup"]:
                    sync(device)
                    t0 = time.perf_counter()
                micro_step(model, batch, gen, config, device, 1.0 / max(int(batch.loss_mask.sum()), 1))
                float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if i >= s["warmup"]:
                    tokens += batch.n_tokens
            sync(device)
            seconds = time.perf_counter() - t0
            rate = tokens / seconds
            rows.append({"loss": loss, "batch_tokens": bt, "tokens_per_s": rate, "step_ms": 1000 * seconds / s["steps"],
                         "mfu": 6 * params * rate / (peak * 1e12) if peak else None, "peak_gib": peak_gib(device)})
            log(f"distill {loss} {bt}: {rate:,.0f} tokens/s")
    agreement = y_agreement(model, plans[s["batch_tokens"][1]][: max(2, s["steps"])], gen, cache, student_dir, s, device, work)
    loss_memory = chunked_loss_memory(model, cache, s, device, work, student_dir)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, {"y_agreement": agreement, "loss_memory": loss_memory, "params": params}


@contextlib.contextmanager
def watching_draws(model):
    """Records, per chunk of one training step, the y' drawn in the forward pass,
    the y' the checkpointed recomputation trains (the kept draw, or the old code's
    second draw), and the y' a fresh draw from the recomputed logits would give."""
    import hpd_tools.training.student as distill  # where chunked_loss calls the loss and the sampler
    import hpd_tools.losses as losses

    original = getattr(losses, "sample_from_logits", None)
    if original is None:
        yield None
        return
    rec: dict = {"forward": [], "trained": [], "redrawn": [], "backward_heads": 0}

    def in_backward() -> bool:  # the recomputation runs inside the autograd engine
        return torch._C._current_graph_task_id() != -1

    def sampler(logits, noise, *args, **kwargs):
        y = original(logits, noise, *args, **kwargs)
        if in_backward():
            rec["trained"].append(y.detach().clone())
        else:
            rec["forward"].append((noise.detach().clone(), y.detach().clone()))
        return y

    compute = distill.compute_loss

    def computing(name, logits, targets, **options):
        if in_backward() and getattr(targets, "sampled", None) is not None:
            rec["trained"].append(targets.sampled.detach().clone())
        return compute(name, logits, targets, **options)

    def head_hook(module, inputs, output):
        if not in_backward():
            return
        j = len(rec["forward"]) - 1 - rec["backward_heads"]  # backward recomputes the last chunk first
        rec["backward_heads"] += 1
        if j >= 0 and output.shape[0] == rec["forward"][j][0].shape[0]:
            rec["redrawn"].append((j, original(output.detach(), rec["forward"][j][0])))

    patched = [m for m in (losses, distill) if getattr(m, "sample_from_logits", None) is original]
    for m in patched:
        m.sample_from_logits = sampler
    distill.compute_loss = computing
    handle = model.get_output_embeddings().register_forward_hook(head_hook)
    try:
        yield rec
    finally:
        handle.remove()
        distill.compute_loss = compute
        for m in patched:
            m.sample_from_logits = original


def y_agreement(model, batches, gen, cache, student_dir, s, device, work) -> dict:
    from hpd_tools.distill import DistillConfig, micro_step

    config = DistillConfig(caches=[cache], student=str(student_dir), out=str(work / "unused"), loss="hpd", batch_tokens=s["batch_tokens"][1], dtype="bfloat16",
                            loss_chunk_tokens=s["loss_chunk_tokens"])
    chunks = positions = trained_same = redrawn_same = redrawn_n = 0
    with watching_draws(model) as rec:
        if rec is None:
            return {"note": "hpd_tools.losses has no sample_from_logits: not measured"}
        for batch in batches:
            rec.update(forward=[], trained=[], redrawn=[], backward_heads=0)
            micro_step(model, batch, gen, config, device, 1.0 / max(int(batch.loss_mask.sum()), 1))
            model.zero_grad(set_to_none=True)
            forward = [y for _, y in rec["forward"]]
            trained = rec["trained"][::-1]  # recorded last chunk first
            chunks += len(forward)
            positions += sum(y.numel() for y in forward)
            if len(trained) == len(forward):
                trained_same += sum(int((a == b).sum()) for a, b in zip(forward, trained))
            for j, y in rec["redrawn"]:
                redrawn_same += int((forward[j] == y).sum())
                redrawn_n += y.numel()
    return {"chunks": chunks, "compared": positions, "trained_agreement": trained_same / positions if positions else None,
            "redraw_agreement": redrawn_same / redrawn_n if redrawn_n else None, "redraw_flips": redrawn_n - redrawn_same,
            "note": "trained: the y' the recomputation trains; redraw: a fresh draw from the recomputed logits (what resampling would train)"}


def chunked_loss_memory(model, cache, s, device, work, student_dir) -> list[dict]:
    """Peak memory of ``chunked_loss`` (forward + backward) above its inputs, on
    random hidden states standing in for the student's, per batch size."""
    from hpd_tools.distill import DistillConfig, chunked_loss, to_targets

    hidden_size = int(model.config.hidden_size)
    out = []
    for loss in ("hpd", "fkl"):
        for bt in s["batch_tokens"]:
            config = DistillConfig(caches=[cache], student=str(student_dir), out=str(work / "unused"), loss=loss, batch_tokens=bt, dtype="bfloat16", loss_chunk_tokens=s["loss_chunk_tokens"])
            batch = batches_for(cache, bt, 1)[0]
            _, targets = to_targets(batch, device)
            targets.noise = torch.rand(targets.labels.shape[0], generator=torch.Generator().manual_seed(0)).to(device)
            rows = int(targets.labels.shape[0])
            hidden = torch.randn(rows, hidden_size, device=device, dtype=torch.bfloat16, requires_grad=True)
            model.zero_grad(set_to_none=True)
            peak_reset(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            with torch.autocast(device.type, dtype=torch.bfloat16):
                total, _ = chunked_loss(model, hidden, targets, config)
            total.backward()
            sync(device)
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
            inputs = 2 * hidden.numel() * hidden.element_size() / 2**20  # the hidden states and their gradient
            out.append({"loss": loss, "batch_tokens": bt, "rows": rows, "peak_mib": peak, "hidden_and_grad_mib": inputs,
                        "head_grad_mib": sum(p.numel() * 4 for p in model.get_output_embeddings().parameters()) / 2**20})
            del hidden, total, targets
            model.zero_grad(set_to_none=True)
    return out


# -- 6: resume --------------------------------------------------------------------------------

def resume_check(student_dir: Path, cache: str, s: dict, work: Path) -> dict:
    from hpd_tools.distill import DistillConfig, train

    def losses(out: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}

    a, b = work / "resume-straight", work / "resume-resumed"
    config = DistillConfig(caches=[cache], student=str(student_dir), out=str(a), loss="hpd", max_steps=20, save_every=10,
                           batch_tokens=s["resume_batch_tokens"], lr=1e-4, warmup_steps=2, dtype="bfloat16", seed=3,
                           loss_chunk_tokens=s["loss_chunk_tokens"], report_to=["none"])  # a GPU machine may lack tensorboard
    t0 = time.time()
    train(config)
    b.mkdir()
    for name in ("hpd-run.json", "metrics.jsonl"):
        shutil.copy(a / name, b / name)
    shutil.copytree(a / "step-000010", b / "step-000010")
    train(replace(config, out=str(b), resume=True))
    straight, resumed = losses(a), losses(b)
    steps = list(range(11, 21))
    diffs = [abs(straight[i] - resumed[i]) for i in steps if i in straight and i in resumed]
    worst = max(diffs) if len(diffs) == len(steps) else None
    rel = None if worst is None else max(abs(straight[i] - resumed[i]) / max(abs(straight[i]), 1e-12) for i in steps)
    return {"steps": len(diffs), "max_abs_diff": worst, "max_rel_diff": rel, "seconds": round(time.time() - t0, 1),
            "equal": worst == 0.0, "within_1e-4": rel is not None and rel <= 1e-4,
            "losses_straight": [straight.get(i) for i in steps], "losses_resumed": [resumed.get(i) for i in steps]}


# -- report -----------------------------------------------------------------------------------

def report(r: dict) -> str:
    lines = [f"## GPU check: {r['device_name']} (peak dense bf16 {fmt(r['peak_tflops'], ',.0f')} TFLOP/s), torch {r['torch']}, transformers {r['transformers']}"
             + (" [--tiny]" if r["tiny"] else ""), "",
             f"Student {r['student_params'] / 1e6:,.1f}M parameters ({r['student_shape']}); teacher {r['teacher_params'] / 1e6:,.1f}M; "
             f"data {r['cache']['sequences']} conversations, {r['cache']['tokens']:,} tokens, k={r['k']}. Wall time {r['seconds']:.0f} s.", "",
             "### Distill steps (bf16 autocast; forward, chunked loss, backward, clipping, AdamW)", "",
             "| loss | batch tokens | tokens/s | MFU | step ms | peak GiB |", "|---|---|---|---|---|---|"]
    for row in r["distill"]:
        lines.append(f"| {row['loss']} | {row['batch_tokens']:,} | {row['tokens_per_s']:,.0f} | {fmt(row['mfu'] and 100 * row['mfu'], '.1f')}{'%' if row['mfu'] else ''} "
                     f"| {row['step_ms']:,.0f} | {fmt(row['peak_gib'], '.1f')} |")
    rate = {(x["loss"], x["batch_tokens"]): x["tokens_per_s"] for x in r["distill"]}
    lines += ["", "HPD/SFT tokens/s: " + ", ".join(f"{bt:,}: {rate[('hpd', bt)] / rate[('sft', bt)]:.2f}x" for bt in r["batch_tokens"])
              + "; FKL/SFT: " + ", ".join(f"{bt:,}: {rate[('fkl', bt)] / rate[('sft', bt)]:.2f}x" for bt in r["batch_tokens"]), ""]
    lines += [f"### Chunked loss memory (forward + backward on the response rows' hidden states, {r['loss_chunk_tokens']:,} rows a chunk)", "",
              "| loss | batch tokens | response rows | peak above inputs MiB | of which hidden + grad MiB | LM head grad MiB |", "|---|---|---|---|---|---|"]
    for row in r["loss_memory"]:
        lines.append(f"| {row['loss']} | {row['batch_tokens']:,} | {row['rows']:,} | {fmt(row['peak_mib'], ',.0f')} | {row['hidden_and_grad_mib']:,.0f} | {row['head_grad_mib']:,.0f} |")
    y = r["y_agreement"]
    lines += ["", "### y' (HPD's sampled token): the forward pass's draw against the checkpointed recomputation", "",
              "| chunks | positions | trained y' = forward y' | a redraw from recomputed logits = forward y' | redraw flips |", "|---|---|---|---|---|",
              f"| {y.get('chunks', 'n/a')} | {y.get('compared', 0):,} | {fmt(y.get('trained_agreement'), '.6f')} | {fmt(y.get('redraw_agreement'), '.6f')} "
              f"| {y.get('redraw_flips', 'n/a')} |", "", y["note"], ""]
    e, c = r["engine"], r["cache"]
    lines += ["### hf cache engine", "",
              "| path | tokens/s | peak GiB |", "|---|---|---|",
              f"| engine score() ({e['engine_dtype']}, chunked from hidden states) | {e['engine_tokens_per_s']:,.0f} | {fmt(e['engine_peak_gib'], '.1f')} |",
              f"| bare forward + float32 log_softmax + top-k | {e['bare_tokens_per_s']:,.0f} | {fmt(e['bare_peak_gib'], '.1f')} |",
              f"| build_cache, teacher time only (whole run {c['seconds']} s, {c['bytes_per_token']} B/token) | {fmt(c['score_tokens_per_s'], ',.0f')} | |", ""]
    z = r["resume"]
    verdict = "equal" if z["equal"] else ("within 1e-4 relative" if z["within_1e-4"] else "DIFFERENT")
    lines += ["### Resume (hpd, 20 steps straight against 10 + resume + 10)", "",
              "| steps compared | max abs diff | max rel diff | result |", "|---|---|---|---|",
              f"| {z['steps']} | {fmt(z['max_abs_diff'], '.3g')} | {fmt(z['max_rel_diff'], '.3g')} | {verdict} |", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes and a few steps (the CPU proof)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary folder, removed)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, when its name is not in the table")
    args = parser.parse_args()

    import transformers

    s = SHAPES["tiny" if args.tiny else "real"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    started = time.time()
    work = args.keep or Path(tempfile.mkdtemp(prefix="hpd-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["HPD_CACHE_HOME"] = str(work / "cache-root")
    try:
        peak, name = peak_tflops(device, args.peak_tflops)
        log(f"device {name}; work folder {work}")
        tok = work / "tokenizer"
        build_tokenizer(tok, s["tokenizer_vocab"])
        teacher, student, small = work / "teacher", work / "student", work / "resume-student"
        teacher_params = build_model(teacher, s["teacher"], tok, seed=1, device=device)
        student_params = build_model(student, s["student"], tok, seed=2, device=device)
        build_model(small, s["resume"], tok, seed=3, device=device)
        data = work / "conversations.jsonl"
        write_conversations(data, s["conversations"], s["turns"])
        log("models and data built; building the cache with the hf engine")
        cache, cache_info = build_the_cache(work, teacher, data, s)
        log(f"cache: {cache_info}")
        engine = engine_against_bare(teacher, cache, s, device)
        log(f"engine: {engine}")
        distill_rows, extra = distill_rates(student, cache, s, device, peak, work)
        log("resume check")
        resume = resume_check(small, cache, s, work)
        shape = s["student"]
        results = {
            "device_name": name, "peak_tflops": peak, "torch": torch.__version__, "transformers": transformers.__version__, "tiny": args.tiny,
            "student_params": student_params, "teacher_params": teacher_params, "k": s["k"], "batch_tokens": list(s["batch_tokens"]), "loss_chunk_tokens": s["loss_chunk_tokens"],
            "student_shape": f"{shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, vocabulary {shape['vocab_size']:,}",
            "cache": cache_info, "engine": engine, "distill": distill_rows, "resume": resume,
            "loss_memory": extra["loss_memory"], "y_agreement": extra["y_agreement"], "seconds": time.time() - started,
        }
        text = report(results)
        print(text, flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
