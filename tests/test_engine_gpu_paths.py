"""The engines' GPU-facing logic, checked on the CPU: log-probs chunk by chunk (equal to
the full log-softmax, never a [batch, length, vocab] tensor), the hf engine's dtype,
placement and options, vLLM's batched-token sizing and version range."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hpd_tools.engines import check_engine_args, make_teacher
from hpd_tools.engines.hf import HFTeacher, auto_dtype, choose_placement, weight_bytes
from hpd_tools.engines.vllm import SUPPORTED_VLLM, batched_tokens_for_vocab, check_vllm_version, scoring_batch_args
from hpd_tools.errors import HPDError
from hpd_tools.onpolicy import OnPolicy

ROOT = Path(__file__).resolve().parents[1]


class VocabRows(TorchDispatchMode):
    """The most rows of any tensor an op produces whose last dimension is the
    vocabulary (views of the LM head's weight excepted)."""

    def __init__(self, vocab: int, weight: torch.Tensor):
        super().__init__()
        self.vocab, self.weight_ptr, self.rows = vocab, weight.untyped_storage().data_ptr(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab and t.untyped_storage().data_ptr() != self.weight_ptr:
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


def _sequences(n: int, vocab: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=int(rng.integers(2, 60))).astype(np.int64) for _ in range(n)]


@pytest.fixture(scope="module")
def engine(teacher):
    return HFTeacher(str(teacher), batch_tokens=400, chunk_rows=7)


def test_hf_chunked_scores_equal_the_full_log_softmax(engine):
    seqs = _sequences(12, engine.vocab_size)
    got = engine.score(seqs, 8)
    assert engine.dtype == "float32" and engine.from_hidden
    with torch.inference_mode():
        for seq, sc in zip(seqs, got):
            ids = torch.from_numpy(seq)[None]
            lp = torch.log_softmax(engine.model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            top_lp, top_ids = lp.topk(8, dim=-1)
            label = lp.gather(-1, ids[0, 1:, None])[:, 0]
            np.testing.assert_allclose(sc.label_logprob, label.numpy(), atol=2e-5, rtol=0)
            np.testing.assert_allclose(sc.topk_logprobs, top_lp.numpy(), atol=2e-5, rtol=0)
            np.testing.assert_array_equal(sc.topk_ids, top_ids.numpy())
    # One chunk for everything: the same scores (to the rounding of a GEMM of another height).
    whole = HFTeacher.__new__(HFTeacher)
    whole.__dict__.update({**engine.__dict__, "chunk_rows": 1 << 20})
    for a, b in zip(got, whole.score(seqs, 8)):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-5, rtol=0)


def test_hf_score_holds_at_most_a_chunk_of_vocabulary_rows(engine):
    head = engine.model.get_output_embeddings().weight
    for n in (4, 24):  # 100 and 700 scored positions or so: far more than the 7-row chunk
        seqs = _sequences(n, engine.vocab_size, seed=n)
        watch = VocabRows(engine.vocab_size, head)
        with watch:
            engine.score(seqs, 4)
        assert 0 < watch.rows <= engine.chunk_rows, (n, watch.rows)
        assert sum(len(s) - 1 for s in seqs) > 10 * engine.chunk_rows


def test_onpolicy_student_logprobs_chunked(engine):
    model = engine.model
    prompts = [s[:5] for s in _sequences(6, engine.vocab_size, seed=3)]
    completions = [s[: i * 7] for i, s in enumerate(_sequences(6, engine.vocab_size, seed=4))]  # one empty
    holder = SimpleNamespace(config=SimpleNamespace(loss_chunk_tokens=5))
    watch = VocabRows(engine.vocab_size, model.get_output_embeddings().weight)
    with watch:
        got = OnPolicy._student_logprobs(holder, model, prompts, completions, torch.device("cpu"))
    assert 0 < watch.rows <= 5
    with torch.no_grad():
        for p, c, lp in zip(prompts, completions, got):
            ids = torch.from_numpy(np.concatenate([p, c]))[None]
            full = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
            assert lp.shape == (len(c),)
            np.testing.assert_allclose(lp, full[len(p) - 1 :].numpy(), atol=2e-5, rtol=0)


def test_hf_dtype_placement_and_weight_bytes(teacher):
    from hpd_tools.cache.writer import _resolve_dtype

    assert auto_dtype() == "float32" and _resolve_dtype("auto", "hf") == "float32"  # no GPU here
    params = sum(p.numel() for p in HFTeacher(str(teacher), chunk_rows=64).model.parameters())
    assert weight_bytes(teacher, "float32") == 4 * params
    assert weight_bytes(teacher, "bfloat16") == 2 * params
    assert weight_bytes(teacher / "nowhere", "float32") is None
    gib = 2**30
    assert choose_placement(10 * gib, 80 * gib) == "device"
    assert choose_placement(75 * gib, 80 * gib) == "auto"  # past 90% of the free memory
    assert choose_placement(None, 80 * gib) == "device"


def test_hf_engine_options(teacher):
    seqs = _sequences(3, 1024, seed=9)
    sdpa = make_teacher("hf", str(teacher), k=4, max_length=64, engine_args={"attn_implementation": "sdpa"}).score(seqs, 4)
    eager = make_teacher("hf", str(teacher), k=4, max_length=64, engine_args={"attn_implementation": "eager"}).score(seqs, 4)
    for a, b in zip(sdpa, eager):
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-4)
    with pytest.raises(HPDError, match=r"^attn_implementation=no_such_kernel: transformers refused it for .*; choose sdpa or eager") as err:
        make_teacher("hf", str(teacher), k=4, max_length=64, engine_args={"attn_implementation": "no_such_kernel"})
    assert "\n" not in str(err.value)
    with pytest.raises(HPDError, match='^--vllm-arg attn_implementation=3: the hf engine expects a string'):
        check_engine_args("hf", {"attn_implementation": 3}, where="--vllm-arg")
    with pytest.raises(HPDError, match="^--vllm-arg enforce_eager: the hf engine .* takes no engine options but attn_implementation"):
        check_engine_args("hf", {"attn_implementation": "sdpa", "enforce_eager": True}, where="--vllm-arg")


def test_vllm_batched_tokens_follow_the_vocabulary(teacher):
    # Qwen2.5's 151,936 ids: 2 GiB / (4 B x 151,936) = 3,533 tokens -> 3,328 (a multiple of 256).
    assert batched_tokens_for_vocab(151_936, 16_384) == 3_328
    assert 4 * 3_328 * 151_936 <= 2 * 2**30
    assert batched_tokens_for_vocab(49_152, 16_384) == 10_752  # SmolLM2
    assert batched_tokens_for_vocab(32_000, 8_192) == 8_192  # never above vLLM's default
    assert batched_tokens_for_vocab(4_000_000, 16_384) == 512  # the floor
    assert batched_tokens_for_vocab(1_024, 4_096) == 4_096  # the tiny teacher on this CPU: as before
    # The engine's arguments: the user's value wins; max_num_seqs follows the budget (vLLM needs tokens >= seqs).
    assert scoring_batch_args(str(teacher), {"max_num_batched_tokens": 2048}, 513, defaults=(16_384, 1_024)) == {}
    assert scoring_batch_args(str(teacher), {}, 513, defaults=(4_096, 256)) == {"max_num_batched_tokens": 4_096, "max_num_seqs": 256}
    big = teacher.parent / "big-vocab"
    big.mkdir(exist_ok=True)
    (big / "config.json").write_text('{"vocab_size": 151936}')
    assert scoring_batch_args(str(big), {}, 2049, defaults=(16_384, 1_024)) == {"max_num_batched_tokens": 3_328, "max_num_seqs": 1_024}
    assert scoring_batch_args(str(big), {"max_num_seqs": 4096}, 2049, defaults=(16_384, 1_024)) == {"max_num_batched_tokens": 4_096}
    assert scoring_batch_args(str(big), {"enable_chunked_prefill": False}, 8193, defaults=(16_384, 1_024))["max_num_batched_tokens"] == 8_193


def test_vllm_version_range(monkeypatch):
    for ok in ("0.32.0", "0.32.0+cpu", "0.12.0", "0.20.1.dev3+gabc1234", "0.32.1"):
        check_vllm_version(ok)
    for bad in ("0.11.2", "0.33.0", "1.0.0", "not-a-version"):
        with pytest.raises(HPDError, match=rf"^vLLM {bad} is installed; hpd-tools needs vllm>=0.12,<0.33 .*HPD_VLLM_VERSION_CHECK=0") as err:
            check_vllm_version(bad)
        assert "\n" not in str(err.value)
    monkeypatch.setenv("HPD_VLLM_VERSION_CHECK", "0")
    check_vllm_version("0.33.0")
    # The gpu extra pins the range the engine checks.
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["gpu"] == [f"vllm{SUPPORTED_VLLM}"]
    assert "vllm" not in sys.modules  # none of this started vLLM in the test process
