"""The recipe end to end on the tiny teacher (transformers engine): generate,
cache, distill, evaluate, report; and `generate` on its own."""

from __future__ import annotations

import json

from conftest import ROOT, run_cli, train_records, write_jsonl
from hpd_tools.pipeline import PipelineConfig, run_pipeline


def test_generate_answers_prompt_only_records(trained_teacher, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Explain rain."}, {"prompt": ""}, train_records(1)[0]])
    out = tmp_path / "gen.jsonl"
    proc = run_cli("generate", "--teacher", str(trained_teacher), "--data", str(prompts), "--out", str(out), "--engine", "hf",
                   "--n", "2", "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    summary = json.loads(proc.stderr.strip().splitlines()[-1])
    assert summary["prompts"] == 2 and summary["skipped_rows"] == 1
    assert len(rows) + summary["empty_responses"] == 4
    assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][-2]["role"] == "user" for r in rows)
    # A record that already had an answer is asked again: its prompt, a new response.
    regenerated = [r for r in rows if r["id"] == train_records(1)[0]["id"]]
    assert regenerated and regenerated[0]["messages"][0] == train_records(1)[0]["messages"][0]


def test_pipeline_on_the_tiny_teacher(trained_teacher, tmp_path):
    config = PipelineConfig(out=str(tmp_path / "run"), teacher=str(trained_teacher), student_layers="1", engine="hf",
                            train_prompts=str(ROOT / "data/instructions/train.jsonl"), heldout_prompts=str(ROOT / "data/instructions/heldout.jsonl"),
                            max_train_prompts=8, max_heldout_prompts=4, generate={"n": 1, "temperature": 0.7, "max_new_tokens": 16, "seed": 0},
                            top_k=8, distill={"loss": "hpd", "max_steps": 3, "batch_tokens": 1024, "lr": 1e-3}, eval_prompts=2,
                            eval_max_new_tokens=8, eval_show=2)
    report = run_pipeline(config)
    assert set(report["metrics"]) == {"pruned student", "distilled student"}
    for row in report["metrics"].values():
        for key in ("eval/fkl_topk", "eval/student_nll", "eval/teacher_nll", "onpolicy/rkl", "onpolicy/teacher_nll"):
            assert key in row
    assert (tmp_path / "run" / "report.md").read_text().startswith("# Distillation report")
    import matplotlib.image as mpimg

    assert "![training and held-out curves](curves.png)" in (tmp_path / "run" / "report.md").read_text()
    assert mpimg.imread(tmp_path / "run" / "curves.png").shape[0] > 400  # the distill run's curves, drawn
    assert len(report["examples"]) == 2 and report["examples"][0]["teacher"]
    # A rerun finds every step done.
    again = run_pipeline(config)
    assert again["caches"] == report["caches"] and again["timings_s"]["generate"] < 1


def test_pipeline_with_vllm_engines(trained_teacher, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "pipeline_vllm.py"), str(trained_teacher), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["caches"]) == {"train", "heldout"}
    rows = [json.loads(line) for line in (tmp_path / "run" / "train.teacher.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    assert (tmp_path / "run" / "report.json").exists()
