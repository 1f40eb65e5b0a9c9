"""``generate``: sample responses from the teacher for records that carry only prompts.

This is the off-policy data of the method: the teacher's own continuations,
which ``cache`` then scores. Records are ``{"prompt": ...}`` or chat
``{"messages": [...]}`` ending in a user turn (a trailing assistant turn is
dropped and regenerated). Each prompt gets ``n`` samples; the output is JSONL
chat records ``{"id", "sample", "messages"}`` that ``cache`` reads as they are.
The file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import DataSource, Fields, _BadRow, _FatalRow, as_object, chat_messages
from .errors import DataError, HPDError
from .outputs import check_output_file
from .progress import Progress

log = logging.getLogger(__name__)


@dataclass
class GenerateConfig:
    teacher: str
    data: str
    out: str
    n: int = 1
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 256
    seed: int = 0
    engine: str = "vllm"
    fields: Fields = Fields()
    engine_args: dict[str, Any] | None = None
    revision: str | None = None  # a Hub teacher's branch, tag or commit
    data_split: str | None = None  # a dataset folder's or Hub dataset's split (default: train)
    data_config: str | None = None

    def validate(self) -> None:
        if self.n < 1:
            raise HPDError(f"--n {self.n}: must be at least 1")
        if self.temperature < 0:
            raise HPDError(f"--temperature {self.temperature}: must be >= 0")
        if self.max_new_tokens < 1:
            raise HPDError(f"--max-new-tokens {self.max_new_tokens}: must be at least 1")
        if self.engine not in ("vllm", "hf"):
            raise HPDError(f"--engine {self.engine}: choose vllm or hf")


def _prompt_messages(record: Any, fields: Fields) -> list[dict[str, str]]:
    record = as_object(record)
    messages = chat_messages(record, fields)  # chat or ShareGPT, content as a string or text parts
    if messages is not None:
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages:
            raise _BadRow("no usable prompt messages")
        return messages
    prompt = record.get(fields.prompt)
    if not isinstance(prompt, str) or not prompt.strip():
        raise _BadRow(f"missing field '{fields.prompt}'")
    return [{"role": "user", "content": prompt}]


def generate_responses(config: GenerateConfig, llm: Any = None) -> dict[str, Any]:
    """Sample ``n`` teacher responses per prompt; returns a summary.

    ``llm``: a ``vllm.LLM`` of the teacher already running (kept open), to
    generate several files with one engine start.
    """
    config.validate()
    from transformers import AutoTokenizer

    from .hub import local_model

    config = dataclasses.replace(config, teacher=local_model(config.teacher, config.revision, "--teacher"))
    source = DataSource(config.data, config.data_split, config.data_config)
    check_output_file(config.out, "--out", inputs=[("--data", None if source.hub else config.data), ("--teacher", config.teacher)])
    tokenizer = AutoTokenizer.from_pretrained(config.teacher)
    if not getattr(tokenizer, "chat_template", None):
        raise HPDError(f"--teacher {config.teacher}: no chat template; generation needs one to render prompts")
    items, skipped = [], 0
    for row, record in source.rows():
        try:
            messages = _prompt_messages(record, config.fields)
        except _FatalRow as bad:
            raise DataError(f"{config.data} {source.row_word} {row}: {bad}") from None
        except _BadRow as bad:
            skipped += 1
            log.warning("%s %s %s: %s (skipped)", config.data, source.row_word, row, bad)
            continue
        rid = record.get("id", f"row-{row}") if isinstance(record, dict) else f"row-{row}"
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        items.append((rid, messages, ids))
    if not items:
        raise DataError(f"{config.data}: no usable prompts")
    started = time.time()
    progress = Progress(total=len(items) * config.n, unit="responses", desc="generate")
    texts = _sample(config, tokenizer, [ids for _, _, ids in items], progress, llm)
    progress.close()
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    written = empty = 0
    with tmp.open("w") as f:
        for (rid, messages, _), samples in zip(items, texts):
            for j, text in enumerate(samples):
                if not text.strip():
                    empty += 1
                    continue
                f.write(json.dumps({"id": rid, "sample": j, "messages": messages + [{"role": "assistant", "content": text}]}, ensure_ascii=False) + "\n")
                written += 1
    os.replace(tmp, out)
    return {"out": str(out), "prompts": len(items), "responses": written, "empty_responses": empty, "skipped_rows": skipped, "seconds": round(time.time() - started, 1)}


def start_vllm(teacher: str, *, seed: int = 0, max_model_len: int | None = None, engine_args: dict[str, Any] | None = None) -> Any:
    """An in-process vLLM engine for generation (float32 and in-process engine core on CPU)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    import vllm
    from vllm import LLM

    from .engines.vllm import check_vllm_version, quiet_load_args

    check_vllm_version(vllm.__version__)  # the same releases as the cache engine (the gpu extra's range)

    args = {"model": teacher, "seed": seed, **({"dtype": "float32"} if not torch.cuda.is_available() else {}), **quiet_load_args()}
    if max_model_len:
        args["max_model_len"] = max_model_len
    args.update(engine_args or {})
    return LLM(**args)


def _sample(config: GenerateConfig, tokenizer: Any, prompts: list[list[int]], progress: Progress, llm: Any = None) -> list[list[str]]:
    eos = tokenizer.eos_token_id
    if config.engine == "vllm":
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        own = llm is None
        if own:
            longest = max(len(p) for p in prompts) + config.max_new_tokens
            llm = start_vllm(config.teacher, seed=config.seed, max_model_len=longest + 1, engine_args=config.engine_args)
        try:
            # The engine-level seed makes sampling reproducible; a per-request seed
            # fails on vLLM's CPU backend ("CPU Generator does not use offset").
            params = SamplingParams(n=config.n, temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_new_tokens,
                                    stop_token_ids=[eos] if eos is not None else None)
            outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
            progress.update(len(prompts) * config.n)
            return [[c.text for c in o.outputs] for o in outputs]
        finally:
            if own:
                try:
                    llm.llm_engine.engine_core.shutdown()
                except Exception as exc:  # a finished generation must not fail at shutdown
                    log.debug("vLLM shutdown: %s", exc)
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(config.teacher, dtype=torch.float32).eval()
    results = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            out = model.generate(ids, do_sample=config.temperature > 0, temperature=config.temperature or None, top_p=config.top_p,
                                 max_new_tokens=config.max_new_tokens, num_return_sequences=config.n, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
        results.append([tokenizer.decode(row[len(p):], skip_special_tokens=True) for row in out])
        progress.update(config.n)
    return results
