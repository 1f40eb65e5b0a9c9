"""Every CacheConfig and DistillConfig field is a flag of its command, with the
field's help and default (the flags are made from the fields: hpd_tools/cli.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpd_tools.cache import CacheConfig
from hpd_tools.cli import CACHE_DEFAULTS, _FieldOption, _recipe_and_flags, main
from hpd_tools.config import build
from hpd_tools.distill import DistillConfig
from hpd_tools.errors import HPDError

REQUIRED = object()
COMMANDS = [("cache", CacheConfig, CACHE_DEFAULTS), ("distill", DistillConfig, {})]


def field_paths(cls: type) -> dict[tuple[str, ...], object]:
    """Each field (a nested dataclass's fields one by one) and its default (REQUIRED: none)."""
    out: dict[tuple[str, ...], object] = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory() if f.default_factory is not dataclasses.MISSING else REQUIRED
        if dataclasses.is_dataclass(default):
            out.update({(f.name, sub.name): getattr(default, sub.name) for sub in dataclasses.fields(default)})
        else:
            out[(f.name,)] = default
    return out


@pytest.mark.parametrize("name,cls,command_defaults", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_field_has_a_flag_with_its_help_and_default(name, cls, command_defaults):
    command = main.commands[name]
    # The values click gives each flag when it is not on the command line, through
    # the conversion a given flag goes through: equal to the field's own default.
    ctx = command.make_context(name, [])
    flags = {p.path: p for p in command.params if isinstance(p, _FieldOption)}
    fields = field_paths(cls)
    assert set(flags) == set(fields)
    for path, default in fields.items():
        flag = flags[path]
        assert flag.help and flag.help.strip(), f"{flag.opts[0]} has no help"
        expected = command_defaults.get(path[0], default) if len(path) == 1 else default
        value = ctx.params[flag.name]
        if expected is REQUIRED:  # --cache, --student, --out: no default to show; the command asks for them
            assert not value, flag.opts[0]
        else:
            assert (flag.to_field(value) if value is not None else None) == expected, flag.opts[0]


@pytest.mark.parametrize("name,cls,command_defaults", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_help_lists_every_flag(name, cls, command_defaults):
    result = CliRunner().invoke(main, [name, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    listed = {word.rstrip(",") for line in result.output.splitlines() for word in line.split() if word.startswith("--")}
    for flag in main.commands[name].params:
        assert set(flag.opts) | set(flag.secondary_opts) <= listed, flag.opts
    # Hand-written behaviours kept beside the generated flags.
    assert {"--config", "--cache" if name == "distill" else "--vllm-arg"} <= listed


def parse(name: str, args: list[str], recipe: Path | None = None) -> dict:
    """The values the command builds its config from, in-process, without running the stage."""
    command = main.commands[name]
    with command.make_context(name, args) as ctx:
        return _recipe_and_flags(ctx, str(recipe) if recipe else None)


def test_flags_reach_the_config():
    """Flags that are not plain values: repeatable, KEY=VALUE, a comma list, I/N,
    --no-x, --x/--no-x, two numbers, a nested dataclass's fields."""
    d = build(DistillConfig, parse("distill", [
        "--cache", "a", "--cache", "b", "--cache-weight", "1", "--cache-weight", "3", "--student", "s", "--out", "o", "--loss-option", "tail=ignore",
        "--report-to", "tensorboard, none", "--pack", "--betas", "0.8", "0.9", "--online-engine-arg", "timeout=5", "--max-steps", "7"]))
    assert d.caches == ["a", "b"] and d.cache_weights == [1.0, 3.0] and d.loss_options == {"tail": "ignore"} and d.max_steps == 7
    assert d.report_to == ["tensorboard", "none"] and d.pack and d.betas == (0.8, 0.9) and d.online_engine_args == {"timeout": 5}
    assert d.lr == DistillConfig.lr and not d.fsdp  # not given: the dataclass's default
    assert parse("distill", ["--no-pack"]) == {"pack": False}

    c = build(CacheConfig, {**CACHE_DEFAULTS, **parse("cache", ["--shard", "1/3", "--no-reuse", "--messages-field", "chat", "--vllm-arg", "enforce_eager=true"])})
    assert c.shard == (1, 3) and c.reuse is False and c.fields.messages == "chat" and c.fields.prompt == "prompt" and c.engine_args == {"enforce_eager": True}


def test_flags_override_the_recipe_mappings_key_by_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("fields: {response: a}\nengine_args: {enforce_eager: true}\ntop_k: 16\nseed: 3\n")
    values = parse("cache", ["--prompt-field", "q", "--vllm-arg", "max_num_seqs=8", "--top-k", "4"], recipe)
    assert values == {"fields": {"response": "a", "prompt": "q"}, "engine_args": {"enforce_eager": True, "max_num_seqs": 8}, "top_k": 4, "seed": 3}


def test_online_engine_arg_is_checked_as_the_flag_names_it():
    values = parse("distill", ["--cache", "c", "--student", "s", "--out", "o", "--online-teacher", "http://localhost:1", "--sample-every", "1",
                               "--online-engine-arg", "retry=1"])
    with pytest.raises(HPDError, match=r"^--online-engine-arg retry=1: the server engine has no option 'retry'; did you mean retries"):
        build(DistillConfig, values).validate()
