"""The training loop's GPU paths, checked on the CPU where the logic allows.

The sampled token y' is drawn once and reused by the recomputation; a non-finite
gradient norm stops the run before the optimizer steps; checkpoints hold the CUDA
generators (none here) and only the newest --keep-checkpoints; --dtype auto is
resolved once and compared resolved on resume; FSDP2 runs with bf16 parameters;
--attn-implementation reaches transformers; an in-process vLLM online teacher is
refused under torchrun.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import run_cli
from test_cache import reseal_checksums
from test_distill import config
from test_distributed import torchrun
from hpd_tools.distill import DistillConfig, chunked_loss, check_online_teacher_placement, resolve_dtype, train
from hpd_tools.errors import HPDError
from hpd_tools.losses import Targets, compute_loss, sample_from_logits
from hpd_tools.parallel import World


# -- y' is drawn once ---------------------------------------------------------------------

class PerturbedLater(torch.nn.Module):
    """An LM head whose logits move by ``eps`` (rising along the vocabulary) once
    ``on`` is set: set after the forward pass, it perturbs only the recomputation
    in backward, as a GPU's bf16 kernels may. Every CDF value falls, so a draw
    just under a bucket's upper edge flips to a later token when resampled."""

    def __init__(self, head: torch.nn.Module, eps: float):
        super().__init__()
        self.head, self.eps, self.on = head, eps, False

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.head(h)
        return z + self.eps * torch.linspace(0, 1, z.shape[-1]) if self.on else z


@pytest.fixture(scope="module")
def head_case():
    torch.manual_seed(0)
    vocab, width, rows, k = 1024, 64, 300, 8
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, head_dim=32, tie_word_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # a peaked student: y' carries real weight in hpd too
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(rows, width, generator=gen)
    topk_ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(rows)])
    topk_lp = torch.log_softmax(2 * torch.randn(rows, k + 1, generator=gen), -1)[:, :k].sort(-1, descending=True).values
    labels = topk_ids[:, 0].clone()
    labels[::3] = torch.randint(vocab, (len(labels[::3]),), generator=gen)
    with torch.no_grad():  # noise just under the upper edge of a token's CDF bucket
        p = torch.softmax(model.lm_head(hidden).float(), -1)
        cdf = p.cumsum(-1)
        edge = torch.searchsorted(cdf, torch.rand(rows, 1, generator=gen) * cdf[:, -2:-1])  # a token drawn by its mass, never the last
        noise = ((cdf.gather(-1, edge) - 0.05 * p.gather(-1, edge)) / cdf[:, -1:]).squeeze(-1)
    targets = Targets(labels=labels, mask=torch.ones(rows, dtype=torch.bool), label_logprob=torch.where(labels == topk_ids[:, 0], topk_lp[:, 0], topk_lp[:, -1] - 1.0),
                      topk_ids=topk_ids, topk_logprobs=topk_lp, noise=noise)
    return model, hidden, targets, edge.squeeze(-1)


@pytest.mark.parametrize("loss", ["rkl", "hpd"])
def test_recomputation_trains_the_forward_draw(head_case, loss):
    model, hidden0, targets, edge = head_case
    head = model.lm_head
    eps = 1e-3

    def grads(fn) -> torch.Tensor:
        model.zero_grad()
        h = hidden0.clone().requires_grad_()
        fn(h).backward()
        return torch.cat([head.weight.grad.flatten(), h.grad.flatten()])

    def perturbed(h: torch.Tensor) -> torch.Tensor:
        return head(h) + eps * torch.linspace(0, 1, head.out_features)

    reference = grads(lambda h: compute_loss(loss, head(h), targets).loss_sum)  # no checkpoint, no recomputation
    wrapped = PerturbedLater(head, eps)
    model.set_output_embeddings(wrapped)
    cfg = DistillConfig(caches=["-"], student="-", out="-", loss=loss, loss_chunk_tokens=128)  # 3 chunks

    def checkpointed(h: torch.Tensor) -> torch.Tensor:
        total, _ = chunked_loss(model, h, targets, cfg)
        wrapped.on = True  # from here on: the recomputation
        return total

    try:
        ours = grads(checkpointed)
    finally:
        model.set_output_embeddings(head)
    forward_draw = sample_from_logits(head(hidden0), targets.noise)
    assert torch.equal(forward_draw, edge)
    # The case is sharp: resampling the perturbed logits flips y' at many positions ...
    flipped = sample_from_logits(perturbed(hidden0), targets.noise) != forward_draw
    assert flipped.float().mean() > 0.05
    # ... and training those draws moves the gradient far from the reference.
    resampled = grads(lambda h: compute_loss(loss, perturbed(h), targets).loss_sum)
    # The recomputation trained the forward's draw: exactly the gradient of the loss
    # at the perturbed logits with that y', and the reference's up to the perturbation.
    exact = grads(lambda h: compute_loss(loss, perturbed(h), dataclasses.replace(targets, sampled=forward_draw)).loss_sum)
    distance = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert distance(ours, exact) < 1e-5
    assert distance(ours, reference) < 1e-3
    assert distance(resampled, reference) > 20 * distance(ours, reference)


def test_given_draw_is_the_loss_draw(head_case):
    """A loss handed ``sampled`` equals the loss drawing y' itself from the same noise."""
    model, hidden, targets, _ = head_case
    with torch.no_grad():
        z = model.lm_head(hidden)
        draw = sample_from_logits(z, targets.noise)
        for loss in ("rkl", "hpd"):
            a = compute_loss(loss, z, targets)
            b = compute_loss(loss, z, dataclasses.replace(targets, sampled=draw))
            assert torch.equal(a.loss_sum, b.loss_sum) and all(torch.equal(a.stats[n], b.stats[n]) for n in a.stats)


# -- a non-finite gradient norm --------------------------------------------------------------

def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_nonfinite_gradient_norm_stops_before_the_optimizer_steps(setup, tmp_path):
    """Teacher log-probs of +60 (a writer bug; checksums resealed): HPD's weight
    exp(lt(y)) ~ 1e26 keeps the loss finite, the gradient's squared norm
    overflows float32. The run stops at that step, before AdamW turns the
    gradient into weights, and the checkpoint before it is left as it was."""
    run = tmp_path / "run"
    train(config(setup, run, max_steps=2, save_every=1))
    good, final = _tree(run / "step-000002"), _tree(run / "final")
    poisoned = tmp_path / "poisoned"
    shutil.copytree(setup["train"], poisoned)  # the same cache key: resume accepts it as the run's cache
    arr = zarr.open_group(str(poisoned), mode="r+")["label_logprob"]
    arr[:] = np.full(arr.shape, 60.0, dtype=arr.dtype)
    reseal_checksums(poisoned)
    with pytest.raises(HPDError, match=r"^step 3: gradient norm is (inf|nan) \(loss [0-9.e+]+\) on the batch of sequences \[\d+.*the optimizer did not step and the last good checkpoint is kept"):
        train(config(setup, run, max_steps=4, save_every=1, resume=True, caches=[str(poisoned)]))
    assert _tree(run / "step-000002") == good and _tree(run / "final") == final
    assert not (run / "step-000003").exists()
    assert max(json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()) == 2


# -- checkpoints: kept, pruned, RNG, dtype -----------------------------------------------------

def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def test_keep_checkpoints_keeps_the_newest_and_resumes_from_them(setup, tmp_path):
    run = tmp_path / "run"
    train(config(setup, run, max_steps=5, save_every=1, keep_checkpoints=2))
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step-")) == ["step-000004", "step-000005"]
    meta = json.loads((run / "step-000005" / "meta.json").read_text())
    assert meta["ranks"][0]["cuda_rng"] is None and meta["dtype"] == "float32"  # no CUDA here: nothing to save
    first = _losses(run)
    # Resume from the older one; a checkpoint being written (.tmp) and an unfinished
    # deletion are there too: the first is never touched, the second cleared.
    shutil.rmtree(run / "step-000005")
    shutil.rmtree(run / "final")
    (run / "step-000099.tmp").mkdir()
    (run / "step-000099.tmp" / "meta.json").write_text("{}")
    (run / ".deleting-step-000002").mkdir()
    train(config(setup, run, max_steps=5, save_every=1, keep_checkpoints=2, resume=True))
    assert _losses(run)[5] == pytest.approx(first[5], rel=1e-5, abs=1e-6)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("step-", ".deleting"))) == ["step-000004", "step-000005", "step-000099.tmp"]
    with pytest.raises(HPDError, match=r"^--keep-checkpoints -1: must be an integer of at least 0"):
        config(setup, run, keep_checkpoints=-1).validate()


def test_dtype_auto_resolves_once_and_resumes_by_its_resolution(setup, tmp_path, caplog):
    assert DistillConfig(caches=["c"], student="s", out="o").dtype == "auto"
    assert resolve_dtype("auto", torch.device("cpu")) == "float32" and resolve_dtype("bfloat16", torch.device("cpu")) == "bfloat16"
    with pytest.raises(HPDError, match=r"^--dtype float16: choose auto, float32, bfloat16"):
        DistillConfig(caches=["c"], student="s", out="o", dtype="float16").validate()
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="hpd_tools.distill"):
        train(config(setup, run, max_steps=1))
    assert "precision: float32 on cpu" in caplog.text
    assert json.loads((run / "step-000001" / "meta.json").read_text())["dtype"] == "float32"
    # auto resolved to float32: an explicit float32 is the same run ...
    train(config(setup, run, max_steps=2, dtype="float32", resume=True))
    # ... and so is auto against a checkpoint from before auto (float32 in its config, no resolved dtype).
    path = run / "step-000002" / "meta.json"
    meta = json.loads(path.read_text())
    meta.pop("dtype")
    meta["config"]["dtype"] = "float32"
    path.write_text(json.dumps(meta))
    train(config(setup, run, max_steps=3, resume=True))
    with pytest.raises(HPDError, match=r"trained with --dtype auto \(float32\), this run asks for --dtype bfloat16;"):
        train(config(setup, run, max_steps=4, dtype="bfloat16", resume=True))


def test_fsdp_with_bfloat16_parameters_trains(setup, tmp_path):
    """Two gloo processes, FSDP2 with MixedPrecisionPolicy(bf16 parameters, fp32
    reductions): the root's float32 teacher inputs stay float32 and training runs."""
    out = tmp_path / "fsdp-bf16"
    result = torchrun("distill", "--cache", setup["train"], "--student", str(setup["student"]), "--out", str(out), "--max-steps", "2",
                      "--batch-tokens", "512", "--loss-chunk-tokens", "128", "--fsdp", "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bf16 parameters, fp32 gradient reduction" in result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and all(np.isfinite(r["loss"]) and r["hpd/nll"] > 0 for r in rows if "loss" in r)


# -- attention -----------------------------------------------------------------------------------

def test_eager_and_sdpa_train_alike_and_unknown_attention_is_refused(setup, tmp_path, caplog):
    runs = {}
    for impl in ("eager", "sdpa"):
        with caplog.at_level(logging.INFO, logger="hpd_tools.distill"):
            train(config(setup, tmp_path / impl, max_steps=2, pack=True, attn_implementation=impl))
        assert f"--pack with attention {impl}: packed rows use a block-diagonal mask" in caplog.text
        caplog.clear()
        runs[impl] = [json.loads(line) for line in (tmp_path / impl / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(runs["eager"], runs["sdpa"]):
        assert a["step"] == b["step"] and b["loss"] == pytest.approx(a["loss"], abs=1e-5) and b["hpd/nll"] == pytest.approx(a["hpd/nll"], abs=1e-5)
    with pytest.raises(HPDError, match=r"^--attn-implementation nope: transformers refuses it for --student .*\(ValueError: "):
        train(config(setup, tmp_path / "nope", attn_implementation="nope"))
    assert not (tmp_path / "nope").exists()
    bad = run_cli("distill", "--cache", setup["train"], "--student", str(setup["student"]), "--out", str(tmp_path / "fa2"), "--max-steps", "1",
                  "--attn-implementation", "flash_attention_2")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    lines = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: --attn-implementation flash_attention_2: transformers refuses it"), bad.stderr[-2000:]


# -- the online teacher under torchrun ---------------------------------------------------------

def test_in_process_vllm_online_teacher_is_refused_on_several_ranks(setup, trained_teacher, tmp_path):
    common = dict(caches=["c"], student="s", out="o", sample_every=2)
    two = World(rank=0, world_size=2)
    with pytest.raises(HPDError, match=r"^--online-teacher /t --online-engine vllm: under torchrun \(2 processes\) .* give --online-teacher URL .* or --online-engine hf$"):
        check_online_teacher_placement(DistillConfig(online_teacher="/t", **common), two)
    check_online_teacher_placement(DistillConfig(online_teacher="/t", **common), World())  # one process: its engine has the GPU
    check_online_teacher_placement(DistillConfig(online_teacher="/t", online_engine="hf", **common), two)  # the hf engine runs on the rank's device
    check_online_teacher_placement(DistillConfig(online_teacher="http://127.0.0.1:8000", **common), two)  # a server places itself
    result = torchrun("distill", "--cache", setup["train"], "--student", str(setup["student"]), "--out", str(tmp_path / "run"),
                      "--online-teacher", str(trained_teacher), "--sample-every", "2")
    assert result.returncode != 0
    assert f"error: --online-teacher {trained_teacher} --online-engine vllm: under torchrun (2 processes)" in result.stderr
    assert not (tmp_path / "run").exists()
