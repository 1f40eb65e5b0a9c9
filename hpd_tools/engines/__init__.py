"""Teacher engines behind one interface: vLLM (default), transformers (reference) and a
running vLLM OpenAI-compatible server (by URL)."""

from __future__ import annotations

import inspect
from typing import Any

from ..errors import HPDError
from .base import Scored, TeacherEngine, check_options

ENGINES = ("vllm", "hf", "server")


def check_engine_args(engine: str, engine_args: dict[str, Any] | None, *, where: str, reserved: dict[str, str] | None = None) -> None:
    """Refuse, in one line naming ``where KEY``, engine options ``engine`` does not take.

    vllm: the keywords of ``vllm.LLM`` / ``EngineArgs`` (:func:`.vllm.check_vllm_args`);
    hf: ``attn_implementation`` alone (options for vLLM are an error, not silently
    dropped); server: the keywords of :class:`.server.ServerTeacher`. ``reserved``: keys the caller sets
    from its own options, mapped to the option to use instead. Call it before any
    expensive work.
    """
    if not engine_args:
        return
    if engine == "vllm":
        from .vllm import check_vllm_args

        check_vllm_args(engine_args, where=where, reserved=reserved)
    elif engine == "hf":
        from .hf import HF_OPTIONS

        for key in engine_args:
            if key not in HF_OPTIONS:
                raise HPDError(f"{where} {key}: the hf engine (transformers) takes no engine options but {', '.join(HF_OPTIONS)}; drop {where} {key}, or use the vllm engine")
        check_options(engine_args, HF_OPTIONS, where=where, owner="the hf engine", listing=f"it takes {', '.join(HF_OPTIONS)}", reserved=reserved)
    elif engine == "server":
        import typing

        from .server import ServerTeacher

        hints = typing.get_type_hints(ServerTeacher.__init__)
        accepted = {name: hints.get(name, Any) for name in inspect.signature(ServerTeacher.__init__).parameters if name not in ("self", "url", "max_length")}
        accepted["url"] = str  # make_teacher's server engine takes the URL from its options
        check_options(engine_args, accepted, where=where, owner="the server engine",
                      listing=f"it takes {', '.join(sorted(accepted))}", reserved=reserved)


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

        check_engine_args("hf", engine_args, where="engine_args")
        return HFTeacher(model_dir, dtype=dtype, batch_tokens=batch_tokens, **(engine_args or {}))
    if engine == "server":
        # model_dir is the server's URL; or model_dir is the teacher's folder (read for its
        # vocabulary size) and engine_args["url"] the URL. Other engine_args (model, vocab_size,
        # concurrency, retries, backoff, timeout) pass through to ServerTeacher.
        from .server import ServerTeacher

        check_engine_args("server", engine_args, where="engine_args")
        options = dict(engine_args or {})
        url = options.pop("url", None)
        config_dir = None
        if url is None:
            url = model_dir
        else:
            config_dir = model_dir
        return ServerTeacher(url, max_length=max_length, config_dir=config_dir, **options)
    raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")


__all__ = ["ENGINES", "Scored", "TeacherEngine", "check_engine_args", "make_teacher"]
