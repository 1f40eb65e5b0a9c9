"""The quality table: losses compared on the SmolLM2-135M recipe, same student init,
same data, same steps, several seeds.

    HPD_CACHE_HOME=... python benchmarks/quality.py [--config recipes/smollm2-135m/pipeline.yaml]
        [--out runs/quality] [--seeds 0 1] [--max-steps 40] [--losses sft fkl rkl hpd hpd+onpolicy hpd-cached]
        [--sources dense top64 top16 sampled --samples 32]

Steps 1-4 of the pipeline (teacher import, pruned student, teacher responses,
caches) run once; then one distill run per (loss, seed), each evaluated on
the held-out cache (forward KL to the teacher on its top-k, student NLL) and
on its own samples for held-out prompts scored by the teacher (reverse KL,
teacher NLL). Reference rows: the pruned student before training, and the
teacher itself. Rows report mean +- spread (half the range over seeds).
Writes benchmarks/results/quality.json, quality.md and quality.png (every loss's curves).

``--sources`` (issue 14, what caching costs): each loss is trained from each
teacher signal on the same sequences: ``dense`` (the teacher's full
distribution online, distill --dense-teacher), ``topK`` (a top-K cache; the
recipe's K is its cache, other K are built), ``sampled`` (a cache of --samples
draws per position, ``hpd-tools cache --signal sampled``). Every run is also
scored against the teacher's full distribution on the held-out records
(--eval-teacher: eval/full_fkl), the one yardstick no cache biases; the
held-out top-k FKL is on the recipe's top-K held-out cache for every row.
Columns add bytes per response token of the training cache (the whole cache
on disk over its response tokens) and seconds per step (the run's wall time
over its steps, model and teacher loading included).
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
# The table with --sources: the columns.
SOURCE_METRICS = [("bytes_per_response_token", "bytes / response token"), ("eval/full_fkl", "held-out FKL (full)"),
                  ("eval/fkl_topk", "held-out FKL (top-k)"), ("onpolicy/rkl", "on-policy RKL"),
                  ("onpolicy/teacher_nll", "teacher NLL of own samples"), ("seconds_per_step", "s / step")]


def source_options(source: str, config, prep, samples: int) -> tuple[dict | None, float | None, str]:
    """The distill options that train from ``source``, the training cache's bytes per
    response token (None for the online teacher), and why the source is skipped
    (options None) or an empty string."""
    import dataclasses

    from hpd_tools.cache import CacheConfig, build_cache
    from hpd_tools.cache.catalog import cache_info
    from hpd_tools.cache.layout import CacheStore
    from hpd_tools.errors import HPDError

    if source == "dense":
        return {"dense_teacher": prep.teacher}, None, ""
    recipe_cache = prep.caches["train"]
    common = {"teacher": prep.teacher, "data": prep.data["train"], "engine": config.engine, "max_length": int(CacheStore(recipe_cache).attrs["max_length"])}
    if source.startswith("top") and source[3:].isdigit():
        k = int(source[3:])
        location = recipe_cache if k == config.top_k else build_cache(CacheConfig(top_k=k, **common)).location
    elif source == "sampled":
        if "signal" not in {f.name for f in dataclasses.fields(CacheConfig)}:
            return None, None, "this hpd-tools has no `cache --signal sampled`"
        try:
            location = build_cache(CacheConfig(signal="sampled", samples=samples, **common)).location
        except HPDError as exc:
            return None, None, f"the sampled cache was not built ({exc})"
    else:
        raise SystemExit(f"--sources {source}: give dense, topK (e.g. top64) or sampled")
    return {"caches": [location]}, float(cache_info(location)["bytes_per_response_token"]), ""


def last_logged(run_dir: Path, key: str) -> float | None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return float(values[-1]) if values else None


def full_fkl(prep, model_dir: Path, dcfg, teacher) -> float:
    """eval/full_fkl of the model in ``model_dir`` on the held-out cache (for rows whose run did not log it)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hpd_tools.distill import evaluate
    from hpd_tools.pipeline import run_device

    device = run_device()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    return evaluate(model, prep.caches["heldout"], dcfg, device, teacher=teacher())["eval/full_fkl"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="recipes/smollm2-135m/pipeline.yaml")
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--losses", nargs="+", default=["sft", "fkl", "rkl", "hpd", "hpd+onpolicy"])
    parser.add_argument("--sample-every", type=int, default=10, help="on-policy rounds for the +onpolicy rows")
    parser.add_argument("--results", default="benchmarks/results")
    parser.add_argument("--sources", nargs="+", default=None,
                        help="teacher signals to train each loss from: dense, topK (top64, top16, ...), sampled (default: the recipe's cache only)")
    parser.add_argument("--samples", type=int, default=32, help="draws per position of the sampled source's cache")
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
    run_names: list[str] = []
    skipped: dict[str, str] = {}
    dcfg = None
    columns = SOURCE_METRICS if args.sources else METRICS
    teacher_cache: list = []

    def eval_teacher():  # the held-out yardstick's teacher, loaded once, for rows whose run did not log eval/full_fkl
        if not teacher_cache:
            from transformers import AutoTokenizer

            from hpd_tools.pipeline import run_device
            from hpd_tools.training.config import resolve_dtype
            from hpd_tools.training.dense import load_teacher

            device = run_device()
            teacher_cache.append(load_teacher(prep.teacher, "--eval-teacher", AutoTokenizer.from_pretrained(prep.student),
                                              dtype=resolve_dtype(dcfg.dtype, device), device=device))
        return teacher_cache[0]

    for source in args.sources or [None]:
        if source is not None:
            options_, bytes_, why = source_options(source, config, prep, args.samples)
            if options_ is None:
                print(f"skipping source {source}: {why}")
                skipped[source] = why
                continue
        for name in args.losses:
            row = name if source is None else f"{source} {name}"
            for seed in args.seeds:
                loss, options = VARIANTS.get(name.split("+")[0], (name.split("+")[0], {}))
                distill = dict(base, loss=loss, save_every=0)
                if options:
                    distill["loss_options"] = {**base.get("loss_options", {}), **options}
                if name.endswith("+onpolicy"):
                    distill.update(sample_every=args.sample_every, sample_prompts=8, sample_max_new_tokens=64, onpolicy_weight=0.5)
                if source is not None:
                    distill.update(options_, eval_teacher=prep.teacher)
                run_dir = Path(args.out) / f"{row.replace(' ', '-')}-seed{seed}"
                fresh = not (run_dir / "final" / "config.json").exists()
                t = time.time()
                dcfg = distill_run(config, prep, run_dir, distill, seed)
                timing = run_dir / "quality-seconds.json"
                if fresh:  # a finished run is skipped: its time is the one recorded when it trained
                    timing.write_text(json.dumps({"seconds": time.time() - t, "steps": dcfg.max_steps}))
                metrics, _ = evaluate_model(config, prep, run_dir / "final", dcfg)
                if source is not None:
                    recorded = json.loads(timing.read_text()) if timing.exists() else None
                    metrics["seconds_per_step"] = recorded["seconds"] / recorded["steps"] if recorded else None
                    metrics["bytes_per_response_token"] = bytes_
                    metrics["eval/full_fkl"] = last_logged(run_dir, "eval/full_fkl") or full_fkl(prep, run_dir / "final", dcfg, eval_teacher)
                rows.setdefault(row, []).append(metrics)
                logging.info("%s seed %d: %s", row, seed, {k: round(metrics[k], 4) for k, _ in columns if metrics.get(k) is not None})
            run_names.append(row)
    if dcfg is None:
        raise SystemExit("no run trained (every source skipped)")
    reference = {"pruned student (before training)": [evaluate_model(config, prep, prep.student, dcfg)[0]],
                 "teacher": [evaluate_model(config, prep, Path(prep.teacher), dcfg)[0]]}
    if args.sources:
        for name, path in (("pruned student (before training)", prep.student), ("teacher", Path(prep.teacher))):
            reference[name][0]["eval/full_fkl"] = full_fkl(prep, path, dcfg, eval_teacher)
    table = {**reference, **rows}

    lines = ["| model | " + " | ".join(label for _, label in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    summary = {}
    for name, runs in table.items():
        cells = []
        summary[name] = {}
        for key, _ in columns:
            if any(r.get(key) is None for r in runs):  # the online teacher has no cache bytes; reference rows did not train
                summary[name][key] = None
                cells.append("n/a")
                continue
            values_ = np.array([r[key] for r in runs])
            mean, spread = float(values_.mean()), float((values_.max() - values_.min()) / 2)
            summary[name][key] = {"mean": mean, "spread": spread, "runs": values_.tolist()}
            cells.append(f"{mean:.3f}" + (f" +- {spread:.3f}" if len(runs) > 1 else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [f"\nskipped source {source}: {why}" for source, why in skipped.items()]
    text = "\n".join(lines)
    print(text)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "quality.json").write_text(json.dumps({"args": vars(args), "steps": base.get("max_steps"), "summary": summary, "skipped": skipped,
                                                     "seconds": round(time.time() - started)}, indent=2))
    # One figure of every run's curves (the first seed of each loss), to compare the losses at a glance.
    from hpd_tools.plot import plot_runs

    figure = plot_runs([str(Path(args.out) / f"{name.replace(' ', '-')}-seed{args.seeds[0]}") for name in run_names], str(results / "quality.png"),
                       title=f"distill losses on the recipe's data, seed {args.seeds[0]}")
    (results / "quality.md").write_text(text + f"\n\n![curves]({figure.name})\n")


if __name__ == "__main__":
    main()
