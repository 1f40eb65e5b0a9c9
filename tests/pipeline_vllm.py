"""Runs the recipe with vLLM engines on a given teacher, for tests/test_pipeline.py:
``python tests/pipeline_vllm.py TEACHER OUT`` (vLLM needs a __main__ guard)."""

import json
import os
import sys
from pathlib import Path


def main() -> None:
    teacher, out = sys.argv[1], sys.argv[2]
    from hpd_tools.pipeline import PipelineConfig, run_pipeline

    root = Path(__file__).resolve().parents[1]
    config = PipelineConfig(out=out, teacher=teacher, student_layers="1", engine="vllm",
                            train_prompts=str(root / "data/instructions/train.jsonl"), heldout_prompts=str(root / "data/instructions/heldout.jsonl"),
                            max_train_prompts=6, max_heldout_prompts=3, generate={"n": 1, "temperature": 0.7, "max_new_tokens": 16, "seed": 0},
                            top_k=8, distill={"loss": "hpd", "max_steps": 2, "batch_tokens": 1024, "lr": 1e-3}, eval_prompts=2,
                            eval_max_new_tokens=8, eval_show=1)
    report = run_pipeline(config)
    print(json.dumps({"timings": report["timings_s"], "caches": report["caches"]}))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
