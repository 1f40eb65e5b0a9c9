"""Sampled scoring in the vLLM engine (issue 14): draws made inside vLLM's model runner
against the transformers model's exact distribution, on the tiny teacher.

One vLLM engine in a subprocess (tests/vllm_sampled_driver.py: vLLM needs a __main__
guard) scores the sequences three ways and tries the two refusals; the reference draws
are the transformers engine's (HFTeacher.score with the same seeds), and the statistical
test's exact distribution the transformers model's float64 log-softmax.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import train_records, write_jsonl
from hpd_tools.engines.vllm_sampling import distinct_host
from hpd_tools.sampling import distinct, record_seed, sample_rows

HERE = Path(__file__).parent
SAMPLES = 64
LENGTHS = [5, 37, 180, 300, 260, 220]  # 180+ are prefilled in chunks (128 batched tokens)
ALPHA = 1e-3  # the statistical test's false-alarm rate


@pytest.fixture(scope="module")
def run(teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-sampled")
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 1000, n).astype(np.int64) for n in LENGTHS]
    seeds = [record_seed(7, i) for i in range(len(seqs))]
    data = write_jsonl(root / "train.jsonl", train_records(12))
    np.savez(root / "seqs.npz", seeds=np.array(seeds, dtype=np.int64), samples=np.array(SAMPLES), data=np.array(str(data)),
             cache_out=np.array(str(root / "vllm-cache")), **{f"seq_{i}": s for i, s in enumerate(seqs)})
    proc = subprocess.run([sys.executable, str(HERE / "vllm_sampled_driver.py"), str(teacher), str(root / "seqs.npz"), str(root / "out.npz")],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return seqs, seeds, dict(np.load(root / "out.npz")), root


@pytest.fixture(scope="module")
def exact(teacher, run):
    """The transformers model's float64 log-probs [m-1, V] of each sequence."""
    from transformers import AutoModelForCausalLM

    seqs = run[0]
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [model(input_ids=torch.from_numpy(s)[None]).logits[0, :-1].double().log_softmax(-1) for s in seqs]


def rows(out: dict, name: str, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return out[f"{name}_{i}_ids"], out[f"{name}_{i}_lp"], out[f"{name}_{i}_counts"]


def test_draws_are_deterministic_across_calls_batching_and_order(run):
    seqs, _, out, _ = run
    for i, seq in enumerate(seqs):
        ids, lps, counts = rows(out, "a", i)
        assert ids.shape == lps.shape == counts.shape == (len(seq) - 1, SAMPLES)
        assert (counts.sum(1) == SAMPLES).all() and ((counts > 0) == np.isfinite(lps)).all()
        assert (ids[counts == 0] == 0).all()
        for other in ("b", "c"):  # the same call again; reversed, in two batches (so other prefill chunks)
            for x, y in zip(rows(out, "a", i), rows(out, other, i)):
                np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(out[f"a_{i}_label"], out[f"{other}_{i}_label"])


def test_draws_match_the_transformers_engine_with_the_same_seeds(run, exact, teacher):
    from hpd_tools.engines.hf import HFTeacher

    seqs, seeds, out, _ = run
    hf = HFTeacher(str(teacher), batch_tokens=512).score(seqs, SAMPLES, samples=SAMPLES, seeds=seeds)
    same = total = 0
    for i, (seq, lp) in enumerate(zip(seqs, exact)):
        ids, lps, counts = rows(out, "a", i)
        ref_ids, ref_counts = hf[i].topk_ids, hf[i].sample_counts
        match = (ids == ref_ids).all(1) & (counts == ref_counts).all(1)
        same, total = same + int(match.sum()), total + len(match)
        for r in np.flatnonzero(~match):  # a differing row: draws that crossed a CDF boundary to the next id, nothing else
            diff = np.zeros(lp.shape[1] + 1, dtype=np.int64)
            np.add.at(diff, ids[r], counts[r])
            np.add.at(diff, ref_ids[r], -ref_counts[r].astype(np.int64))
            gained, lost = np.repeat(np.arange(len(diff)), diff.clip(min=0)), np.repeat(np.arange(len(diff)), (-diff).clip(min=0))
            assert len(gained) == len(lost) and (np.abs(gained - lost) == 1).all(), (i, r, gained, lost)
        # The stored log-probs are the exact teacher log-probs of the drawn ids, the label's too.
        drawn = counts > 0
        np.testing.assert_allclose(lps[drawn], lp.gather(1, torch.from_numpy(ids)).numpy()[drawn], atol=1e-4)
        np.testing.assert_allclose(out[f"a_{i}_label"], lp.gather(1, torch.from_numpy(seq[1:, None])).squeeze(1).numpy(), atol=1e-4)
    print(f"vLLM and transformers draw the same {SAMPLES} tokens at {same}/{total} positions ({same / total:.2%})")
    assert same / total >= 0.99


def chi_square(counts_by_row: list[tuple[np.ndarray, np.ndarray]], lp: list[torch.Tensor]) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom over every position: per position, a bin
    per token with expected count N*p >= 5 and one bin for the rest (kept when its expected
    count is >= 5, else merged into the smallest kept bin); positions are independent, so
    the per-position statistics add (df = bins - 1 each)."""
    stat, df = 0.0, 0
    for (ids, counts), logp in zip(counts_by_row, lp):
        p = logp.exp().numpy()
        for r in range(len(p)):
            observed = np.zeros(p.shape[1])
            np.add.at(observed, ids[r], counts[r])
            expected = SAMPLES * p[r]
            big = np.flatnonzero(expected >= 5)
            if len(big) == 0:
                continue
            o, e = list(observed[big]), list(expected[big])
            rest_o, rest_e = SAMPLES - sum(o), SAMPLES - sum(e)
            if rest_e >= 5:
                o.append(rest_o)
                e.append(rest_e)
            else:
                j = int(np.argmin(e))
                o[j] += rest_o
                e[j] += rest_e
            if len(e) < 2:
                continue
            o, e = np.array(o), np.array(e)
            stat += float(((o - e) ** 2 / e).sum())
            df += len(e) - 1
    return stat, df


def chi2_sf(stat: float, df: int) -> float:
    """P(chi-square_df >= stat): the regularised upper incomplete gamma Q(df/2, stat/2)."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def test_vllm_draws_follow_the_teachers_distribution(run, exact):
    """Chi-square goodness of fit of vLLM's counts to N*p (p: the transformers model's exact
    distribution), false-alarm rate ALPHA; the same test rejects draws from the teacher at
    temperature 1.5, so it has power against a distortion of that size."""
    seqs, seeds, out, _ = run
    stat, df = chi_square([(out[f"a_{i}_ids"], out[f"a_{i}_counts"]) for i in range(len(seqs))], exact)
    p_value = chi2_sf(stat, df)
    print(f"vLLM draws: chi-square {stat:.1f} on {df} df, p = {p_value:.3f}")
    assert df > 200 and p_value > ALPHA
    hot = []
    for i, (seq, lp) in enumerate(zip(seqs, exact)):
        ids, _, counts = sample_rows((lp / 1.5).log_softmax(-1).float(), seeds[i], torch.arange(len(seq) - 1), SAMPLES)
        hot.append((ids.numpy(), counts.numpy()))
    stat_hot, df_hot = chi_square(hot, exact)
    print(f"temperature 1.5 draws: chi-square {stat_hot:.1f} on {df_hot} df, p = {chi2_sf(stat_hot, df_hot):.2e}")
    assert chi2_sf(stat_hot, df_hot) < ALPHA


def test_host_reduction_equals_sampling_distinct():
    """vLLM's draws are reduced to distinct ids on the host from their own log-probs; the
    result is hpd_tools.sampling.distinct's, ties and padding included."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 50, generator=gen) * 3
    logits[:, 10] = logits[:, 11]  # exact ties, broken by id
    lp = logits.log_softmax(-1)
    raw = torch.multinomial(lp.exp(), 16, replacement=True, generator=gen)
    want = distinct(raw, lp)
    got = distinct_host(raw.numpy(), lp.gather(1, raw).numpy())
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x, y.numpy())


def test_refusals_are_one_line(run):
    out = run[2]
    version = str(out["version"])
    for key in ("refused_tensor_path", "refused_no_hook"):
        message = str(out[key])
        assert message and "\n" not in message and f"vLLM {version}" in message, (key, message)
    assert "HPD_VLLM_TENSOR_LOGPROBS" in str(out["refused_tensor_path"])
    assert "vllm.general_plugins" in str(out["refused_no_hook"])


def test_topk_scoring_beside_sampled_requests_is_unchanged(run, exact):
    out = run[2]
    want_lp, want_ids = exact[0].float().topk(8, dim=-1)
    np.testing.assert_allclose(out["topk_lp"], want_lp.numpy(), atol=1e-4)
    tied = np.zeros(want_ids.shape, dtype=bool)  # ids by rank, except where log-probs tie within float noise
    close = np.abs(np.diff(want_lp.numpy(), axis=1)) < 1e-4
    tied[:, :-1] |= close
    tied[:, 1:] |= close
    assert ((out["topk_ids"] == want_ids.numpy()) | tied).all()


def test_the_vllm_plugin_entry_point_installs_the_hooks():
    """vLLM's own processes (engine core, workers on GPUs) load hpd-tools' hooks through
    the vllm.general_plugins entry point."""
    from importlib.metadata import entry_points

    from hpd_tools.engines import vllm_sampling

    (point,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "hpd_tools"]
    assert point.load() is vllm_sampling.register


def test_v2_runner_hook_draws_at_absolute_positions_over_prefill_chunks(monkeypatch):
    """vLLM 0.32's default runner on GPUs (V2, PromptLogprobsWorker) cannot run here (it
    needs Triton): its hook is driven directly, the real worker with torch stand-ins for its
    two Triton kernels (the target ids and the top-k scores), over two prefill chunks of a
    batch holding a sampled and a top-k request. The sampled rows equal sample_rows on the
    full log-probs; the top-k rows are vLLM's."""
    from types import SimpleNamespace

    pl = pytest.importorskip("vllm.v1.worker.gpu.sample.prompt_logprob")
    from vllm import SamplingParams
    from vllm.v1.outputs import LogprobsTensors

    from hpd_tools.engines import vllm_sampling

    def target_ids(num_tokens, query_start_loc, idx_mapping, num_computed_tokens, all_token_ids):
        out = torch.zeros(num_tokens, dtype=torch.int64)
        starts = query_start_loc.tolist()
        for b, req in enumerate(idx_mapping.tolist()):
            first = int(num_computed_tokens[req]) + 1
            row = all_token_ids[req, first : first + starts[b + 1] - starts[b]]
            out[starts[b] : starts[b] + len(row)] = row
        return out

    def topk_scores(logits, num_logprobs, sampled_token_ids, *args, logits_mode=False, **kwargs):
        lp = logits.log_softmax(-1, dtype=torch.float32)
        ids = torch.cat((sampled_token_ids[:, None], lp.topk(num_logprobs, -1).indices), 1)
        return LogprobsTensors(ids, lp.gather(1, ids), (lp > lp.gather(1, sampled_token_ids[:, None])).sum(1) + 1)

    monkeypatch.setattr(pl, "get_prompt_logprobs_token_ids", target_ids)
    monkeypatch.setattr(pl, "compute_topk_scores", topk_scores)
    monkeypatch.setattr(pl.PromptLogprobsWorker, "add_request", pl.PromptLogprobsWorker.add_request)  # undone after the test
    monkeypatch.setattr(pl.PromptLogprobsWorker, "remove_request", pl.PromptLogprobsWorker.remove_request)
    monkeypatch.setattr(pl.PromptLogprobsWorker, "compute_prompt_logprobs", pl.PromptLogprobsWorker.compute_prompt_logprobs)
    monkeypatch.setattr(pl, "CHUNK_SIZE", 16)  # the LM head's row chunks cut through the requests' rows
    monkeypatch.setattr(vllm_sampling, "status", {})
    vllm_sampling._patch_v2(pl)

    gen = torch.Generator().manual_seed(0)
    vocab, n, seed = 97, 16, record_seed(3, 5)
    lens = [40, 30]  # request 0 sampled, request 1 top-k
    tokens = torch.randint(vocab, (2, 64), generator=gen)
    head = torch.randn(8, vocab, generator=gen) * 2
    states = [torch.randn(lens[r], 8, generator=gen) for r in range(2)]  # the "hidden state" of each prompt position
    worker = pl.PromptLogprobsWorker(4, torch.device("cpu"))
    worker.add_request("s", 0, SamplingParams(max_tokens=1, prompt_logprobs=n, extra_args={vllm_sampling.SEED_KEY: seed}))
    worker.add_request("t", 1, SamplingParams(max_tokens=1, prompt_logprobs=4))
    out, computed = {}, [0, 0]
    for step in ((25, 18), (15, 12)):  # two prefill chunks of each prompt
        qsl = np.concatenate(([0], np.cumsum(step)))
        batch = SimpleNamespace(req_ids=["s", "t"], idx_mapping_np=np.array([0, 1]), idx_mapping=torch.tensor([0, 1]),
                                num_computed_prefill_tokens_np=np.array(computed), num_scheduled_tokens=np.array(step),
                                prefill_len_np=np.array(lens), num_tokens=int(qsl[-1]), query_start_loc_np=qsl,
                                query_start_loc=torch.from_numpy(qsl))
        hidden = torch.cat([states[r][computed[r] : computed[r] + step[r]] for r in range(2)])
        out.update(worker.compute_prompt_logprobs(lambda h: h @ head, hidden, batch, tokens, torch.tensor(computed + [0, 0]), np.array(lens + [0, 0])))
        computed = [c + s for c, s in zip(computed, step)]
    lp = (states[0] @ head).log_softmax(-1)[: lens[0] - 1]
    got = out["s"]
    np.testing.assert_array_equal(got.logprob_token_ids[:, 0].numpy(), tokens[0, 1 : lens[0]].numpy())
    assert (got.selected_token_ranks == vllm_sampling.DRAWN_RANK).all()
    ids, lps, counts = distinct_host(got.logprob_token_ids[:, 1:].numpy(), got.logprobs[:, 1:].numpy())
    want = sample_rows(lp, seed, torch.arange(lens[0] - 1), n)
    for x, y in zip((ids, lps, counts), want):
        np.testing.assert_array_equal(x, y.numpy())
    top = out["t"]
    lp_t = (states[1] @ head).log_softmax(-1)[: lens[1] - 1]
    np.testing.assert_array_equal(top.logprob_token_ids[:, 1:].numpy(), lp_t.topk(4, -1).indices.numpy())
    assert (top.selected_token_ranks >= 1).all()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("HPD_TEST_VLLM_SPAWN") != "1", reason="~90 s on 2 cores (two fresh vLLM interpreters); HPD_TEST_VLLM_SPAWN=1 runs it")
def test_vllm_processes_load_the_hook_through_the_plugin_entry_point(run, teacher):
    """As on GPUs: the engine core in a process of its own, started by spawn (a fresh
    interpreter: nothing patched is inherited), gets the hook from the entry point alone
    and draws what the in-process engine drew. Opt-in: the suite's time budget."""
    seqs, _, out, root = run
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    proc = subprocess.run([sys.executable, str(HERE / "vllm_sampled_driver.py"), str(teacher), str(root / "seqs.npz"), str(root / "spawned.npz"), "spawned"],
                          capture_output=True, text=True, timeout=600, check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spawned = np.load(root / "spawned.npz")
    for i in range(len(seqs)):
        for x, y in zip(rows(out, "a", i), rows(spawned, "a", i)):
            np.testing.assert_array_equal(x, y)


def test_a_vllm_sampled_cache_equals_the_transformers_one_up_to_boundary_draws(run, teacher):
    """`build_cache --engine vllm --signal sampled` through the real writer: it verifies, and its
    rows are those of the same cache built with the transformers engine, but for draws at CDF
    boundaries (the same seeds and positions draw the same tokens)."""
    import zarr

    from hpd_tools.cache import CacheConfig, build_cache, verify_cache

    root = run[3]
    built = root / "vllm-cache"
    assert verify_cache(built).complete
    ref = root / "hf-cache"
    build_cache(CacheConfig(teacher=str(teacher), data=str(root / "train.jsonl"), engine="hf", signal="sampled", samples=SAMPLES,
                            out=str(ref), chunk_tokens=512, max_length=256, reuse=False))
    a, b = zarr.open_group(str(built), mode="r"), zarr.open_group(str(ref), mode="r")
    for name in ("tokens", "offsets", "loss_mask", "example_id"):
        np.testing.assert_array_equal(a[name][:], b[name][:])
    mask = a["loss_mask"][:]
    same = ((a["topk_ids"][:] == b["topk_ids"][:]).all(1) & (a["sample_counts"][:] == b["sample_counts"][:]).all(1))[mask]
    print(f"vLLM and transformers sampled caches: identical rows at {same.mean():.2%} of {mask.sum()} response positions")
    assert same.mean() >= 0.98
    np.testing.assert_allclose(a["label_logprob"][:][mask], b["label_logprob"][:][mask], atol=2e-3)
