"""Teacher engines behind one interface: vLLM (default), transformers (reference) and a
running vLLM OpenAI-compatible server (by URL)."""

from __future__ import annotations

from typing import Any

from .base import Scored, TeacherEngine

ENGINES = ("vllm", "hf", "server")


def make_teacher(
    engine: str,
    model_dir: str,
    *,
    k: int,
    max_length: int,
    dtype: str = "auto",
    batch_tokens: int = 8192,
    seed: int = 0,
    engine_args: dict[str, Any] | None = None,
) -> TeacherEngine:
    if engine == "vllm":
        from .vllm import VLLMTeacher

        return VLLMTeacher(model_dir, k=k, max_length=max_length, dtype=dtype, seed=seed, engine_args=engine_args)
    if engine == "hf":
        from .hf import HFTeacher

        return HFTeacher(model_dir, dtype="float32" if dtype == "auto" else dtype, batch_tokens=batch_tokens)
    if engine == "server":
        # model_dir is the server's URL; or model_dir is the teacher's folder (read for its
        # vocabulary size) and engine_args["url"] the URL. Other engine_args (model, vocab_size,
        # concurrency, retries, backoff, timeout) pass through to ServerTeacher.
        from .server import ServerTeacher

        options = dict(engine_args or {})
        url = options.pop("url", None)
        config_dir = None
        if url is None:
            url = model_dir
        else:
            config_dir = model_dir
        return ServerTeacher(url, max_length=max_length, config_dir=config_dir, **options)
    raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")


__all__ = ["ENGINES", "Scored", "TeacherEngine", "make_teacher"]
