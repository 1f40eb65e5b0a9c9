"""Teacher and student of different vocabulary widths over one tokenizer (the seed
paper's pair, Qwen2.5-7B -> 1.5B: 152,064 and 151,936 embedding rows, 151,665
tokens), on tiny models: the teacher's extra rows score high, so its cached top-k
holds ids past the student's logits."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from conftest import ROOT, build_tiny_teacher, run_cli, train_records, write_jsonl
from hpd_tools import CacheConfig, build_cache, cache_info
from hpd_tools.cache.reader import CacheReader
from hpd_tools.distill import DistillConfig, evaluate, to_targets, train
from hpd_tools.errors import HPDError

CLI = str(Path(sys.executable).parent / "hpd-tools")
TEACHER_EXTRA = 24  # teacher rows past the tokenizer
STUDENT_EXTRA = 3  # student rows past the tokenizer: a width between


def widen(src: Path, out: Path, extra: int, *, head_scale: float, layers: int | None = None, seed: int = 0) -> Path:
    """``src``'s model with ``extra`` rows appended to its embeddings: copies of the
    first rows, the LM head's scaled by ``head_scale`` (> 1: the new ids score high)."""
    tok = AutoTokenizer.from_pretrained(src)
    config = AutoConfig.from_pretrained(src)
    base = LlamaForCausalLM.from_pretrained(src).state_dict()
    width = config.vocab_size
    config.vocab_size = width + extra
    config.num_hidden_layers = layers or config.num_hidden_layers
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                rows = base[name][torch.arange(extra) % width]
                param.copy_(torch.cat([base[name], rows * (head_scale if name == "lm_head.weight" else 1.0)]))
            elif layers is None:
                param.copy_(base[name])
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab-width")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HPD_CACHE_HOME", str(root / "cache-root"))
        narrow = build_tiny_teacher(root / "teacher-narrow")
        tokens = len(AutoTokenizer.from_pretrained(narrow))
        teacher = widen(narrow, root / "teacher", TEACHER_EXTRA, head_scale=1.5)
        # A student of its own (random, one layer) whose 3 extra rows score high, so it samples them.
        student = widen(narrow, root / "student", STUDENT_EXTRA, head_scale=40.0, layers=1, seed=1)
        train_data = write_jsonl(root / "train.jsonl", train_records(24))
        heldout = write_jsonl(root / "heldout.jsonl", [json.loads(x) for x in (ROOT / "data/instructions/heldout.jsonl").read_text().splitlines()][:8])
        proc = run_cli("cache", "--teacher", str(teacher), "--data", str(train_data), "--engine", "hf", "--top-k", "16",
                       "--max-length", "512", "--chunk-tokens", "1024", "--out", str(root / "train-cache"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        common = dict(teacher=str(teacher), engine="hf", top_k=16, max_length=512, chunk_tokens=1024)
        eval_cache = build_cache(CacheConfig(data=str(heldout), out=str(root / "eval-cache"), **common)).location
    return {"root": root, "tokens": tokens, "narrow": narrow, "teacher": teacher, "student": student,
            "train": str(root / "train-cache"), "eval": eval_cache}


def dropped_share(cache: str, width: int) -> float:
    """Teacher mass per response token on top-k ids >= width, from the decoded sequences."""
    reader = CacheReader(cache, shuffle=False)
    mass, count = 0.0, 0
    for i in range(len(reader)):
        seq = reader.read_sequence(i)
        mask = seq.loss_mask
        mass += float((np.exp(seq.topk_logprobs[mask].astype(np.float64)) * (seq.topk_ids[mask] >= width)).sum())
        count += int(mask.sum())
    return mass / count


def test_cache_holds_ids_past_the_student_and_verify_accepts_it(pair):
    width = pair["tokens"] + STUDENT_EXTRA
    ids = zarr.open_group(pair["train"], mode="r")["topk_ids"][:]
    assert ids.max() >= width and ids.max() < pair["tokens"] + TEACHER_EXTRA
    assert dropped_share(pair["train"], width) > 0.01
    # verify checks ids against the teacher's own width: all in range.
    proc = run_cli("verify", pair["train"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # info: the mass on rows past the tokenizer, which any student of this tokenizer's width drops.
    info = cache_info(pair["train"])
    assert info["tokenizer_size"] == pair["tokens"] and info["teacher_vocab_size"] == pair["tokens"] + TEACHER_EXTRA
    assert info["mean_topk_mass_past_tokenizer"] == pytest.approx(dropped_share(pair["train"], pair["tokens"]), rel=0.02)


LOSSES = ["fkl", "jsd", "akl", "hpd"]


@pytest.fixture(scope="module")
def cli_runs(pair):
    """``hpd-tools distill`` with each loss, 2 steps and an eval, the four at once."""
    procs = {}
    for loss in LOSSES:
        out = pair["root"] / f"run-{loss}"
        procs[loss] = (out, subprocess.Popen(
            [CLI, "distill", "--cache", pair["train"], "--student", str(pair["student"]), "--out", str(out), "--loss", loss,
             "--max-steps", "2", "--batch-tokens", "1024", "--eval-cache", pair["eval"], "--eval-batches", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HPD_CACHE_HOME": str(pair["root"] / "cache-root")},
        ))
    done = {}
    for loss, (out, proc) in procs.items():
        stderr = proc.communicate(timeout=600)[1]
        done[loss] = (out, proc.returncode, stderr)
    done["_teacher_width"] = pair["tokens"] + TEACHER_EXTRA
    return done


@pytest.mark.parametrize("loss", LOSSES)
def test_distill_cli_with_a_wider_teacher(cli_runs, loss):
    out, code, stderr = cli_runs[loss]
    assert code == 0, stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps)
    assert all(r[f"{loss}/dropped_mass"] > 0.005 for r in steps)
    final_eval = [r for r in rows if "eval/fkl_topk" in r][-1]
    assert final_eval["eval/dropped_teacher_mass"] > 0.005 and math.isfinite(final_eval["eval/fkl_topk"])
    assert f"teacher width {cli_runs['_teacher_width']} > student width" in stderr and "drop out" in stderr


def test_a_student_narrower_than_its_tokenizer_is_refused(pair, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(pair["narrow"])
    model.resize_token_embeddings(pair["tokens"] - 5)
    model.save_pretrained(tmp_path / "narrow-student")
    AutoTokenizer.from_pretrained(pair["narrow"]).save_pretrained(tmp_path / "narrow-student")
    with pytest.raises(HPDError, match=rf"embedding has {pair['tokens'] - 5} rows, fewer than its tokenizer's {pair['tokens']} tokens"):
        train(DistillConfig(caches=[pair["train"]], student=str(tmp_path / "narrow-student"), out=str(tmp_path / "run"), max_steps=1, batch_tokens=1024))
    assert not (tmp_path / "run").exists()


def test_evaluate_matches_a_float64_reference(pair, tmp_path):
    """eval/fkl_topk over the kept ids and eval/dropped_teacher_mass, from the student's
    float64 logits and the cache's arrays."""
    model = AutoModelForCausalLM.from_pretrained(pair["student"], dtype=torch.float32)
    width = model.config.vocab_size
    cfg = DistillConfig(caches=[pair["train"]], student=str(pair["student"]), out=str(tmp_path / "x"), batch_tokens=1024, loss_chunk_tokens=100)
    got = evaluate(model, pair["eval"], cfg, torch.device("cpu"))
    fkl = dropped = nll = count = 0.0
    with torch.no_grad():
        for batch in CacheReader(pair["eval"], shuffle=False).batches(1024):
            inputs, t = to_targets(batch, torch.device("cpu"))
            mask = torch.from_numpy(batch.loss_mask)
            ls = torch.log_softmax(model.double()(**inputs).logits[mask], -1)
            p, keep = t.topk_logprobs.double().exp(), t.topk_ids < width
            lq = ls.gather(-1, t.topk_ids.clamp(max=width - 1).long())
            fkl += float((p * (t.topk_logprobs.double() - lq) * keep).sum())
            dropped += float((p * ~keep).sum())
            nll -= float(ls.gather(-1, t.labels[:, None]).sum())
            count += int(mask.sum())
            model.float()
    assert got["eval/tokens"] == count
    assert got["eval/fkl_topk"] == pytest.approx(fkl / count, rel=1e-5)
    assert got["eval/student_nll"] == pytest.approx(nll / count, rel=1e-5)
    assert got["eval/dropped_teacher_mass"] == pytest.approx(dropped / count, rel=1e-5)
    assert got["eval/dropped_teacher_mass"] == pytest.approx(dropped_share(pair["eval"], width), rel=1e-5)


@pytest.mark.parametrize("online", ["teacher", "narrow"])
def test_onpolicy_with_teachers_wider_and_narrower_than_the_student(pair, online, tmp_path):
    """The wide online teacher's rollout top-k holds ids past the student's width (akl
    reads every top-k id); the narrow one (the tokenizer's width) has no rows for the
    student's extra ids, so continuations are cut before them."""
    out = tmp_path / "run"
    cfg = DistillConfig(caches=[pair["train"]], student=str(pair["student"]), out=str(out), loss="akl", max_steps=2, batch_tokens=1024,
                        lr=1e-3, online_teacher=str(pair[online]), online_engine="hf", sample_every=1, sample_prompts=6,
                        sample_max_new_tokens=12)
    last = train(cfg)
    assert math.isfinite(last["loss"]) and math.isfinite(last["onpolicy/loss"])
    rounds = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "onpolicy/rkl" in r]
    assert len(rounds) == 2 and all(math.isfinite(r["onpolicy/rkl"]) for r in rounds)
    cut = sum(r["onpolicy/frac_cut_past_teacher"] for r in rounds)
    assert cut > 0 if online == "narrow" else cut == 0
