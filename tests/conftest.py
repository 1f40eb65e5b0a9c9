"""Fixtures: a tiny llama teacher and BPE tokenizer built here, and small data files.

The teacher is random but deliberately peaked (large init), so its top-k has
clear gaps between ranks and two engines agree on the order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "data" / "instructions" / "train.jsonl"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_teacher(out: Path, *, vocab: int = 1024, seed: int = 0, layers: int = 2, chat_template: bool = True) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = []
    for line in TRAIN.read_text().splitlines():
        texts.extend(m["content"] for m in json.loads(line)["messages"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,  # vLLM's CPU attention rejects 16
        max_position_embeddings=4096,
        initializer_range=0.15,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def teacher(tmp_path_factory) -> Path:
    return build_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny-llama")


def train_teacher(model_dir: Path, *, steps: int = 80, lr: float = 2e-3, seed: int = 0) -> Path:
    """Fit the tiny teacher to the bundled data in place, so that, like a real
    teacher, it puts real probability on the data's tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    seqs = [tok.apply_chat_template(r["messages"], tokenize=True) for r in train_records()]
    seqs = [list(s["input_ids"] if isinstance(s, dict) or hasattr(s, "keys") else s)[:96] for s in seqs]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        rows = torch.randint(len(seqs), (16,), generator=gen).tolist()
        width = max(len(seqs[i]) for i in rows)
        ids = torch.zeros((16, width), dtype=torch.long)
        labels = torch.full((16, width), -100, dtype=torch.long)
        for j, i in enumerate(rows):
            ids[j, : len(seqs[i])] = torch.tensor(seqs[i])
            labels[j, : len(seqs[i])] = torch.tensor(seqs[i])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="session")
def trained_teacher(tmp_path_factory) -> Path:
    return train_teacher(build_tiny_teacher(tmp_path_factory.mktemp("trained-teacher") / "tiny-llama"))


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch) -> Path:
    """Each test gets its own cache root."""
    root = tmp_path / "cache-root"
    monkeypatch.setenv("HPD_CACHE_HOME", str(root))
    return root


def write_jsonl(path: Path, records: list) -> Path:
    with path.open("w") as f:
        for r in records:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return path


def train_records(n: int | None = None) -> list[dict]:
    records = [json.loads(line) for line in TRAIN.read_text().splitlines()]
    return records[:n] if n else records


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed console script in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    exe = Path(sys.executable).parent / "hpd-tools"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=full_env, timeout=timeout)


def run_cli_rows(rows: list[list[str]], work: Path, protected: list[str] = ()) -> list[subprocess.CompletedProcess]:
    """Several command lines in one process (tests/fuzz_driver.py: the real click
    command through CliRunner), for refusals: a process start costs seconds, a row
    far less. Each result is run_cli's; a row that raised, or changed anything
    under ``protected``, fails here. Not for rows that import vLLM."""
    work.mkdir(parents=True, exist_ok=True)
    spec, results = work / "rows.json", work / "rows.jsonl"
    spec.write_text(json.dumps({"protected": [str(p) for p in protected], "cases": [{"id": str(i), "argv": argv} for i, argv in enumerate(rows)]}))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fuzz_driver.py"), str(spec), str(results)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = {r["id"]: r for r in map(json.loads, results.read_text().splitlines()) if "start" not in r}
    out = []
    for i, argv in enumerate(rows):
        row = done[str(i)]
        assert row["exception"] is None, f"hpd-tools {' '.join(argv)}:\n{row['exception']}"
        assert not row["changed"], f"hpd-tools {' '.join(argv)} changed {row['changed'][:8]}"
        out.append(subprocess.CompletedProcess(["hpd-tools", *argv], row["exit_code"], row["stdout"], row["stderr"]))
    return out


# -- distill: one student and two caches of the trained teacher, shared by every
# module that trains (test_distill, test_dashboards, test_gpu_correctness,
# test_onpolicy*); tests read them and copy before they damage anything.

def make_student(teacher: Path, out: Path, seed: int = 1) -> Path:
    """A 1-layer llama student with the teacher's tokenizer, randomly initialised."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(teacher)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def setup(trained_teacher, tmp_path_factory):
    from hpd_tools import CacheConfig, build_cache

    teacher = trained_teacher
    root = tmp_path_factory.mktemp("distill")
    train_data = write_jsonl(root / "train.jsonl", train_records(60))
    heldout = write_jsonl(root / "heldout.jsonl", [json.loads(line) for line in (ROOT / "data/instructions/heldout.jsonl").read_text().splitlines()][:12])
    common = dict(teacher=str(teacher), engine="hf", top_k=16, max_length=512, chunk_tokens=1024)
    train_cache = build_cache(CacheConfig(data=str(train_data), out=str(root / "train-cache"), **common)).location
    eval_cache = build_cache(CacheConfig(data=str(heldout), out=str(root / "eval-cache"), **common)).location
    student = make_student(teacher, root / "student")
    return {"train": train_cache, "eval": eval_cache, "student": student, "root": root}


@pytest.fixture(scope="session")
def vllm_server(trained_teacher, tmp_path_factory):
    """One vLLM OpenAI server of the trained tiny teacher on 127.0.0.1, shared by the
    tests that only talk to it (test_server_engine, test_onpolicy_server); tests that
    kill a server start their own."""
    from test_server_engine import VLLMServer

    srv = VLLMServer(trained_teacher, tmp_path_factory.mktemp("server-logs"))
    yield srv
    srv.stop()



@pytest.fixture(scope="session")
def vllm_scores(trained_teacher, tmp_path_factory) -> dict:
    """Scores from one in-process vLLM engine of the trained tiny teacher, shared by
    tests/test_engines.py (its tensor and FlatLogprobs paths against transformers) and
    tests/test_onpolicy_server.py (student rollouts, against a vLLM server): one
    engine start instead of two. vLLM runs in a subprocess (tests/engine_parity.py):
    it needs a __main__ guard and must not share the pytest process."""
    import numpy as np

    root = tmp_path_factory.mktemp("vllm-scores")
    student = make_student(trained_teacher, root / "student")  # the weights of `setup`'s student (same teacher, same seed)
    out = root / "scores.npz"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "engine_parity.py"), str(trained_teacher), str(student), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as z:
        return dict(z)
