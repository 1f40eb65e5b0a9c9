"""The quality table: losses compared on the SmolLM2-135M recipe, same student init,
same data, same steps, several seeds.

    HPD_CACHE_HOME=... python benchmarks/quality.py [--config recipes/smollm2-135m/pipeline.yaml]
        [--out runs/quality] [--seeds 0 1] [--max-steps 40] [--losses sft fkl rkl hpd hpd+onpolicy hpd-cached]

Steps 1-4 of the pipeline (teacher import, pruned student, teacher responses,
caches) run once; then one distill run per (loss, seed), each evaluated on
the held-out cache (forward KL to the teacher on its top-k, student NLL) and
on its own samples for held-out prompts scored by the teacher (reverse KL,
teacher NLL). Reference rows: the pruned student before training, and the
teacher itself. Rows report mean +- spread (half the range over seeds).
Writes benchmarks/results/quality.json, quality.md and quality.png (every loss's curves).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

# Row names that are a loss with options (a name's "+onpolicy" suffix still adds on-policy rounds).
VARIANTS = {"hpd-cached": ("hpd", {"forward": "cached"})}
METRICS = [("eval/fkl_topk", "held-out FKL (top-k)"), ("eval/student_nll", "student NLL of teacher data"),
           ("onpolicy/rkl", "on-policy RKL"), ("onpolicy/teacher_nll", "teacher NLL of own samples")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="recipes/smollm2-135m/pipeline.yaml")
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--losses", nargs="+", default=["sft", "fkl", "rkl", "hpd", "hpd+onpolicy"])
    parser.add_argument("--sample-every", type=int, default=10, help="on-policy rounds for the +onpolicy rows")
    parser.add_argument("--results", default="benchmarks/results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from hpd_tools.config import build, load_yaml
    from hpd_tools.pipeline import PipelineConfig, distill_run, evaluate_model, prepare

    values = load_yaml(args.config)
    values["out"] = args.out
    config = build(PipelineConfig, values)
    started = time.time()
    prep = prepare(config)
    base = dict(config.distill)
    if args.max_steps:
        base["max_steps"] = args.max_steps
    rows: dict[str, list[dict]] = {}
    dcfg = None
    for name in args.losses:
        for seed in args.seeds:
            loss, options = VARIANTS.get(name.split("+")[0], (name.split("+")[0], {}))
            distill = dict(base, loss=loss, save_every=0)
            if options:
                distill["loss_options"] = {**base.get("loss_options", {}), **options}
            if name.endswith("+onpolicy"):
                distill.update(sample_every=args.sample_every, sample_prompts=8, sample_max_new_tokens=64, onpolicy_weight=0.5)
            run_dir = Path(args.out) / f"{name}-seed{seed}"
            dcfg = distill_run(config, prep, run_dir, distill, seed)
            metrics, _ = evaluate_model(config, prep, run_dir / "final", dcfg)
            rows.setdefault(name, []).append(metrics)
            logging.info("%s seed %d: %s", name, seed, {k: round(metrics[k], 4) for k, _ in METRICS})
    reference = {"pruned student (before training)": [evaluate_model(config, prep, prep.student, dcfg)[0]],
                 "teacher": [evaluate_model(config, prep, Path(prep.teacher), dcfg)[0]]}
    table = {**reference, **rows}

    lines = ["| model | " + " | ".join(label for _, label in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    summary = {}
    for name, runs in table.items():
        cells = []
        summary[name] = {}
        for key, _ in METRICS:
            values_ = np.array([r[key] for r in runs])
            mean, spread = float(values_.mean()), float((values_.max() - values_.min()) / 2)
            summary[name][key] = {"mean": mean, "spread": spread, "runs": values_.tolist()}
            cells.append(f"{mean:.3f}" + (f" +- {spread:.3f}" if len(runs) > 1 else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "quality.json").write_text(json.dumps({"args": vars(args), "steps": base.get("max_steps"), "summary": summary,
                                                     "seconds": round(time.time() - started)}, indent=2))
    # One figure of every run's curves (the first seed of each loss), to compare the losses at a glance.
    from hpd_tools.plot import plot_runs

    figure = plot_runs([str(Path(args.out) / f"{name}-seed{args.seeds[0]}") for name in args.losses], str(results / "quality.png"),
                       title=f"distill losses on the recipe's data, seed {args.seeds[0]}")
    (results / "quality.md").write_text(text + f"\n\n![curves]({figure.name})\n")


if __name__ == "__main__":
    main()
