"""Teacher engines behind one interface: vLLM (default) and transformers (reference)."""

from __future__ import annotations

from typing import Any

from .base import Scored, TeacherEngine

ENGINES = ("vllm", "hf")


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
    raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")


__all__ = ["ENGINES", "Scored", "TeacherEngine", "make_teacher"]
