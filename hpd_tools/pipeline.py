"""The end-to-end recipe: from a packaged GGUF teacher to a distilled student and a report.

Steps, each skipped when its output is already there (so a rerun continues):

1. teacher: import the GGUF teacher into a Hugging Face folder (logits checked);
2. student: depth-prune the teacher (``student_layers``);
3. generate: the teacher's own responses to the train and held-out prompts;
4. cache: top-k caches of both (content-addressed, under the cache root),
   each checked with ``verify``;
5. distill: train the student on the train cache (``DistillConfig`` fields
   under ``distill``), with on-policy rounds when ``distill.sample_every`` is set;
6. evaluate: the pruned student before training and the trained one, on the
   held-out cache (forward KL to the teacher on its top-k, NLLs) and on their
   own samples for held-out prompts scored by the teacher (reverse KL,
   teacher NLL), with a few outputs next to the teacher's.

Writes ``report.json``, ``report.md`` and ``curves.png`` (the distill run's curves) in ``out``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .cache import CacheConfig, build_cache, verify_cache
from .config import build
from .distill import DistillConfig, evaluate, train
from .generate import GenerateConfig, generate_responses, start_vllm
from .models import default_max_length, parse_layers, prune_layers, resolve_teacher, teacher_context
from .outputs import check_output_folder

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    out: str = "runs/smollm2-135m"
    teacher: str = "smollm2-135m-instruct"  # the packaged teacher, a model folder or a Hub id
    revision: str | None = None  # a Hub teacher's branch, tag or commit (None: its default branch)
    student_layers: str = "0,6,12,18,24,29"
    train_prompts: str = "data/instructions/train.jsonl"
    heldout_prompts: str = "data/instructions/heldout.jsonl"
    max_train_prompts: int = 0  # 0: all
    max_heldout_prompts: int = 0
    generate: dict[str, Any] = field(default_factory=lambda: {"n": 1, "temperature": 0.7, "max_new_tokens": 128, "seed": 0})
    top_k: int = 64
    engine: str = "vllm"
    distill: dict[str, Any] = field(default_factory=dict)
    eval_prompts: int = 12
    eval_max_new_tokens: int = 64
    eval_show: int = 3
    seed: int = 0


def _limit(path: str, n: int, out: Path) -> str:
    if not n:
        return path
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()][:n]
    out.write_text("".join(line + "\n" for line in lines))
    return str(out)


def _shutdown(llm: Any) -> None:
    if llm is not None:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as exc:  # a finished step must not fail at shutdown
            log.debug("vLLM shutdown: %s", exc)


def build_cache_is_complete(config: CacheConfig) -> bool:
    """Whether ``build_cache(config)`` would find its cache complete (no teacher work)."""
    return build_cache(config, dry_run=True).complete


def _stage(name: str) -> float:
    log.info("== %s", name)
    return time.time()


def run_device() -> torch.device:
    """Where the pipeline's evaluation and on-policy rounds run: the device distill
    trains on (hpd_tools.parallel.init_world), the process's GPU when there is one."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def onpolicy_eval(model: Any, tokenizer: Any, teacher_dir: str, prompt_cache: str, n_prompts: int, max_new_tokens: int, seed: int,
                  device: torch.device | None = None, dtype: str = "auto") -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The student's own samples for held-out prompts, scored by the teacher
    (transformers engine): reverse KL and teacher NLL per sampled token.
    ``model`` is on ``device`` (default: :func:`run_device`); it samples under
    distill's ``--dtype`` autocast (``dtype``)."""
    from .onpolicy import OnPolicy

    cfg = SimpleNamespace(seed=seed, onpolicy_buffer=n_prompts, sample_prompts=n_prompts, sample_max_new_tokens=max_new_tokens,
                          sample_temperature=1.0, online_teacher=teacher_dir, online_engine="hf", online_engine_args={}, dtype=dtype)
    torch.manual_seed(seed)
    from .cache.layout import CacheStore

    store = CacheStore(prompt_cache)
    op = OnPolicy(cfg, tokenizer, prompt_cache, k=store.k, max_length=int(store.attrs["max_length"]))
    metrics = op.round(model, device or run_device())
    texts = []
    for r in op.buffer:
        cut = int(r.loss_mask.argmax()) + 1
        texts.append((tokenizer.decode(r.tokens[:cut], skip_special_tokens=True), tokenizer.decode(r.tokens[cut:], skip_special_tokens=True)))
    op.close()
    return metrics, texts


@dataclass
class Prepared:
    """Outputs of steps 1-4, shared by every distillation run of one recipe."""

    teacher: str
    student: Path
    data: dict[str, str]
    caches: dict[str, str]


PIPELINE_MARKER = "hpd-pipeline.json"


def prepare(config: PipelineConfig, timings: dict[str, float] | None = None) -> Prepared:
    """Steps 1-4: teacher, pruned student, teacher responses, caches."""
    timings = timings if timings is not None else {}
    out = Path(config.out)
    check_output_folder(out, "--out", marker=PIPELINE_MARKER, legacy=("report.json", "student-pruned"),
                        inputs=[("--teacher", config.teacher if Path(config.teacher).exists() else None)])
    out.mkdir(parents=True, exist_ok=True)
    (out / PIPELINE_MARKER).write_text(json.dumps({"format": "hpd-tools pipeline run", "config": asdict(config)}, indent=2, default=str))

    t = _stage("1/6 teacher: import the packaged GGUF")
    teacher = resolve_teacher(config.teacher, config.revision)  # a Hub id: its snapshot folder, which carries the commit into the cache keys
    timings["teacher"] = time.time() - t

    t = _stage("2/6 student: depth pruning")
    student = out / "student-pruned"
    if not (student / "config.json").exists():
        prune_layers(teacher, student, parse_layers(config.student_layers))
    timings["student"] = time.time() - t

    t = _stage("3/6 generate: the teacher's responses")
    data, todo = {}, []
    for split, prompts, limit in (("train", config.train_prompts, config.max_train_prompts), ("heldout", config.heldout_prompts, config.max_heldout_prompts)):
        target = out / f"{split}.teacher.jsonl"
        if not target.exists():
            todo.append((_limit(prompts, limit, out / f"{split}.prompts.jsonl"), target))
        data[split] = str(target)
    if todo:
        # One engine for both splits: a vLLM start costs as much as the generation here.
        llm = start_vllm(teacher, seed=int(config.generate.get("seed", 0))) if config.engine == "vllm" else None
        try:
            for source, target in todo:
                generate_responses(GenerateConfig(teacher=teacher, data=source, out=str(target), engine=config.engine, **config.generate), llm=llm)
        finally:
            _shutdown(llm)
    timings["generate"] = time.time() - t

    t = _stage("4/6 cache: teacher top-k")
    from transformers import AutoTokenizer

    # The default --max-length, resolved here so that the shared engine is sized for it.
    context = teacher_context(json.loads((Path(teacher) / "config.json").read_text()), AutoTokenizer.from_pretrained(teacher))
    configs = {split: CacheConfig(teacher=teacher, data=path, top_k=config.top_k, engine=config.engine, max_length=default_max_length(context))
               for split, path in data.items()}
    engine = None
    if config.engine == "vllm" and not all(build_cache_is_complete(c) for c in configs.values()):
        from .engines.vllm import VLLMTeacher

        engine = VLLMTeacher(teacher, k=config.top_k, max_length=max(c.max_length for c in configs.values()))
    try:
        caches = {split: build_cache(c, teacher=engine).location for split, c in configs.items()}
    finally:
        if engine is not None:
            engine.close()
    for location in caches.values():
        verify_cache(location)
    timings["cache"] = time.time() - t
    return Prepared(teacher, student, data, caches)


def distill_run(config: PipelineConfig, prep: Prepared, run_dir: Path, distill: dict[str, Any], seed: int) -> DistillConfig:
    """Step 5 for one set of distill options (resumes or skips a finished run)."""
    values = {"caches": [prep.caches["train"]], "student": str(prep.student), "out": str(run_dir), "eval_cache": prep.caches["heldout"], "seed": seed, **distill}
    if values.get("sample_every") and not values.get("online_teacher"):
        values["online_teacher"] = prep.teacher
    dcfg = build(DistillConfig, values, where="pipeline distill")
    if not (run_dir / "final" / "config.json").exists():
        dcfg.resume = run_dir.exists()
        train(dcfg)
    return dcfg


def evaluate_model(config: PipelineConfig, prep: Prepared, model_dir: Path, dcfg: DistillConfig) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Step 6 for one model: held-out cache metrics and teacher-scored own samples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prep.student)
    device = run_device()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    metrics = evaluate(model, prep.caches["heldout"], dcfg, device)
    on, texts = onpolicy_eval(model, tokenizer, prep.teacher, prep.caches["heldout"], config.eval_prompts, config.eval_max_new_tokens, config.seed, device, dcfg.dtype)
    return {**metrics, **{k: v for k, v in on.items() if k in ("onpolicy/rkl", "onpolicy/teacher_nll", "onpolicy/mean_length")}}, texts


def run_pipeline(config: PipelineConfig) -> dict[str, Any]:
    timings: dict[str, float] = {}
    prep = prepare(config, timings)
    out = Path(config.out)

    t = _stage("5/6 distill")
    run_dir = out / "distill"
    dcfg = distill_run(config, prep, run_dir, config.distill, config.seed)
    timings["distill"] = time.time() - t

    t = _stage("6/6 evaluate")
    rows, samples = {}, {}
    for name, path in (("pruned student", prep.student), ("distilled student", run_dir / "final")):
        rows[name], samples[name] = evaluate_model(config, prep, path, dcfg)
    timings["evaluate"] = time.time() - t

    heldout = [json.loads(line) for line in Path(prep.data["heldout"]).read_text().splitlines()]
    examples = []
    first = next(iter(samples.values()))
    for i in range(min(config.eval_show, len(first))):
        prompt_text = first[i][0]
        match = next((r for r in heldout if r["messages"][-2]["content"] in prompt_text), None)
        examples.append({"prompt": match["messages"][-2]["content"] if match else prompt_text, "teacher": match["messages"][-1]["content"] if match else "",
                         **{name: samples[name][i][1] for name in samples}})
    report = {"config": asdict(config), "caches": prep.caches, "metrics": rows, "timings_s": {k: round(v, 1) for k, v in timings.items()}, "examples": examples}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    from .plot import plot_runs

    report["curves"] = plot_runs([str(run_dir)], str(out / "curves.png"), title="distill: training and held-out curves").name
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_markdown(report))
    return report


def _markdown(report: dict[str, Any]) -> str:
    lines = ["# Distillation report", "", "| model | held-out fkl (top-k) | student NLL | teacher NLL of data | on-policy rkl | teacher NLL of own samples |", "|---|---|---|---|---|---|"]
    for name, m in report["metrics"].items():
        lines.append(f"| {name} | {m['eval/fkl_topk']:.3f} | {m['eval/student_nll']:.3f} | {m['eval/teacher_nll']:.3f} | {m.get('onpolicy/rkl', float('nan')):.3f} | {m.get('onpolicy/teacher_nll', float('nan')):.3f} |")
    if report.get("curves"):
        lines += ["", f"![training and held-out curves]({report['curves']})"]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in report["timings_s"].items()), ""]
    for ex in report["examples"]:
        lines += ["---", f"**Prompt**: {ex['prompt']}", "", f"**Teacher**: {ex['teacher']}", ""]
        for name in report["metrics"]:
            lines += [f"**{name}**: {ex.get(name, '')}", ""]
    return "\n".join(lines)
