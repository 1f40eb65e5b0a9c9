"""The ``hpd-tools`` command: parses options, builds a config, calls the library."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable

import click

from .errors import HPDError

log = logging.getLogger("hpd_tools")

DEFAULT_TEACHER = "smollm2-135m-instruct"
DEFAULT_DATA = "data/instructions/train.jsonl"


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    # vLLM logs to stdout with its own handlers; stdout is for results (the cache
    # location), so route vLLM through our stderr handler, warnings only.
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    # Quiet unless -v: what vLLM, transformers, torch and the Hub print at warning
    # level or below, and their progress bars, says nothing a user can act on (our
    # own progress lines show the work). Errors still show. transformers reads
    # its verbosity and huggingface_hub's bar switch when imported, hence the
    # environment (only set when the user has not set them).
    quiet = logging.DEBUG if verbose else logging.ERROR
    for name in ("vllm", "httpx", "httpcore", "datasets", "filelock", "urllib3", "torch", "py.warnings", "huggingface_hub"):
        logging.getLogger(name).setLevel(quiet)
    logging.captureWarnings(True)  # warnings.warn(...) from libraries go through "py.warnings", above
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # torch's C++ warnings (NUMA binding, ...)
        os.environ.setdefault("WANDB_SILENT", "true")  # --report-to wandb: its banner; distill logs the run's place itself
        os.environ.setdefault("TQDM_DISABLE", "1")  # libraries' own bars (GGUF conversion, ...); hpd_tools.progress passes disable=False
    # vLLM's CPU worker replaces torch.set_num_threads with a function that warns on
    # every call (libraries call it per batch); the warning says nothing to a user.
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: "torch.set_num_threads" not in record.getMessage())


def _finish(code: int) -> None:
    """Exit with ``code``. After vLLM has run, skip interpreter teardown: vLLM can
    abort there (DESIGN.md section 5) and turn a finished run into a failure."""
    sys.stdout.flush()
    sys.stderr.flush()
    if "vllm" in sys.modules:
        os._exit(code)
    sys.exit(code)


def _run(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except HPDError as exc:
        click.echo(f"error: {exc}", err=True)
        _finish(2)
    except KeyboardInterrupt:
        click.echo("interrupted; rerun the same command to continue where it stopped", err=True)
        _finish(130)
    _finish(0)


def _parse_shard(ctx: click.Context | None, param: click.Parameter | None, value: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected I/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise click.BadParameter(f"{value!r}: expected I/N with 0 <= I < N")
    return index, count


def _parse_engine_args(values: tuple[str, ...], option: str = "--vllm-arg") -> dict[str, Any]:
    """KEY=VALUE items of a repeatable ``option``: VALUE as JSON, else as a string."""
    args = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise HPDError(f"{option} {item!r}: expected KEY=VALUE")
        try:
            args[key.replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            args[key.replace("-", "_")] = raw
    return args


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


class _OneLineErrors(click.Group):
    """Usage errors (a value click parses itself, an unknown option) as one line,
    like every other user error: `error: ...` naming the option, exit code 2."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_IS_HELP as exc:  # `hpd-tools` alone: the help, as click prints it
            click.echo(exc.format_message(), err=True)
            sys.exit(2)
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx is not None else "hpd-tools"
            click.echo(f"error: {exc.format_message()} (see `{command} --help`)", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, and the warnings and progress bars of vLLM, transformers, torch and the Hub (hidden otherwise).")
@click.version_option(package_name="hpd-tools")
def main(verbose: bool) -> None:
    """Distill large language models: cache a teacher's top-k log-probs once, train students from the cache."""
    _setup_logging(verbose)


def _print_summary(summary: dict[str, Any]) -> None:
    data = summary["data"]
    lines = [
        f"cache: {'complete' if summary['complete'] else 'INCOMPLETE'} at {summary['location']}",
        f"  key {summary['key']}",
        f"  {summary['sequences']} sequences, {summary['tokens']} tokens ({summary['response_tokens']} response tokens)",
        f"  units computed {summary['units_computed']}/{summary['units_total']}, sequences reused from other caches {summary['sequences_reused']}",
        f"  rows read {data['rows']}, kept {data['kept']}, truncated {data['truncated']}",
    ]
    for reason, info in data["skipped"].items():
        lines.append(f"  skipped {info['count']}: {reason} (first rows {info['first_rows']})")
    rate = f", {summary['tokens_per_second']:,.0f} tokens/s" if summary["tokens_per_second"] else ""
    lines.append(f"  {summary['bytes_on_disk']:,} bytes on disk, {summary['bytes_per_token']} bytes/token, {summary['bytes_per_response_token']} bytes/response token")
    lines.append(f"  {summary['seconds']:.1f} s{rate}" + (" (already complete: no teacher work)" if summary["already_complete"] else ""))
    click.echo("\n".join(lines), err=True)


class _FieldOption(click.Option):
    """The flag of one config field; ``path`` is the field's name, or a nested
    dataclass field's name and its own (``fields.messages``: --messages-field)."""

    def __init__(self, decls: list[str], path: tuple[str, ...], kind: str, **kwargs: Any) -> None:
        super().__init__(decls, **kwargs)
        self.path, self.kind = path, kind

    def to_field(self, value: Any) -> Any:
        """The field's value for the value click parsed from this flag."""
        if self.kind == "list":
            return list(value)
        if self.kind == "comma":
            return [name.strip() for name in value.split(",") if name.strip()]
        if self.kind == "pairs":
            return _parse_engine_args(value, self.opts[0])
        return value


def _field_options(cls: type, command_defaults: dict[str, Any]) -> list[click.Option]:
    """A flag for each field of the config dataclass ``cls``, its help and default
    taken from the field (hpd_tools.config.option says how each is spelt).
    ``command_defaults``: the command's values for fields the library requires."""
    hints = typing.get_type_hints(cls)
    options: list[click.Option] = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None: a flag of X whose default is None
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else command_defaults.get(f.name)
        flag, help_, form = f.metadata.get("flag") or "--" + f.name.replace("_", "-"), f.metadata.get("help"), f.metadata.get("form")
        if dataclasses.is_dataclass(hint):
            for sub in dataclasses.fields(hint):
                options.append(_FieldOption([flag.format(sub.name.replace("_", "-")), f"{f.name}__{sub.name}"], (f.name, sub.name), "value",
                                            default=getattr(default, sub.name), show_default=True, help=(help_ or {}).get(sub.name)))
            continue
        kind, kwargs = "value", {}
        if hint is bool:  # --x (sets true), --no-x (sets a true field false), or --x/--no-x
            kwargs = {} if "/" in flag else {"is_flag": True, "flag_value": not flag.startswith("--no-")}
        elif origin is dict:
            kind, kwargs = "pairs", {"multiple": True, "metavar": "KEY=VALUE"}
            default = tuple(f"{key}={json.dumps(value)}" for key, value in default.items())
        elif origin is list and form == "comma":
            kind, default = "comma", ",".join(default)
        elif origin is list:
            kind, kwargs, default = "list", {"multiple": True, "type": args[0]}, tuple(default or ())
        elif form == "I/N":
            kwargs, default = {"callback": _parse_shard, "metavar": "I/N"}, "/".join(map(str, default))
        elif origin is tuple:
            kwargs = {"nargs": len(args), "type": args[0]}
        elif f.metadata.get("choices"):
            kwargs = {"type": click.Choice(f.metadata["choices"])}
        else:
            kwargs = {"type": hint}
        shown = default not in (None, (), "") and not kwargs.get("is_flag")
        options.append(_FieldOption([flag, f.name], (f.name,), kind, default=default, show_default=shown, help=help_, **kwargs))
    return options


class _ConfigCommand(click.Command):
    """A command with a flag for each field of a config dataclass (``config``,
    "module:Class") besides its own options. The flags are made when first asked
    for, so that the dataclass's import (torch, for distill) is paid by its
    command only, not by `hpd-tools info` or `--help`."""

    def __init__(self, *args: Any, config: str, command_defaults: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.config, self.command_defaults = config, command_defaults or {}
        super().__init__(*args, **kwargs)

    @property  # type: ignore[override]
    def params(self) -> list[click.Parameter]:
        if self._params is None:
            module, _, name = self.config.partition(":")
            fields = _field_options(getattr(importlib.import_module(module, __package__), name), self.command_defaults)
            first = [p for p in self._own if p.name == "config_path"]
            self._params = first + fields + [p for p in self._own if p not in first]
        return self._params

    @params.setter
    def params(self, value: list[click.Parameter]) -> None:
        self._own, self._params = list(value), None


def _recipe_and_flags(ctx: click.Context, config_path: str | None) -> dict[str, Any]:
    """The --config recipe's values, with the field flags given on the command line
    over them (mappings, such as --vllm-arg's, merged key by key)."""
    from click.core import ParameterSource

    from .config import load_yaml

    values = load_yaml(config_path) if config_path else {}
    for option in ctx.command.get_params(ctx):
        if not isinstance(option, _FieldOption) or ctx.get_parameter_source(option.name) != ParameterSource.COMMANDLINE:
            continue
        name, value = option.path[0], option.to_field(ctx.params[option.name])
        if len(option.path) == 2:
            value = {option.path[1]: value}
        if isinstance(value, dict):
            value = {**(values[name] if isinstance(values.get(name), dict) else {}), **value}
        values[name] = value
    return values


CACHE_DEFAULTS = {"teacher": DEFAULT_TEACHER, "data": DEFAULT_DATA}


@main.command(cls=_ConfigCommand, config=".cache:CacheConfig", command_defaults=CACHE_DEFAULTS)
@click.option("--config", "config_path", default=None, help="YAML recipe with CacheConfig fields; options given here override it.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout instead of the location.")
@click.option("--workers", default=1, show_default=True, help="Start this many shard writers (subprocesses) of this cache or --shard and wait for them; one per GPU when GPUs are visible.")
@click.option("--gpus-per-worker", default=None, type=int, help="GPUs each --workers writer gets (default: the tensor_parallel_size --vllm-arg, else 1).")
@click.pass_context
def cache(ctx: click.Context, config_path: str | None, as_json: bool, workers: int, gpus_per_worker: int | None, **_: Any) -> None:
    """Run the teacher over a dataset once and store its top-k log-probs in a cache.

    Prints the cache location. Rerunning the same command reuses a complete
    cache and continues an interrupted one.
    """
    from .cache import CacheConfig, build_cache
    from .config import build
    from .models import resolve_teacher

    def go() -> None:
        values = {**CACHE_DEFAULTS, **_recipe_and_flags(ctx, config_path)}
        config = build(CacheConfig, values, where=f"--config {config_path}" if config_path else "cache options")
        if workers < 1:
            raise HPDError(f"--workers {workers}: must be at least 1")
        if gpus_per_worker is not None and gpus_per_worker < 1:
            raise HPDError(f"--gpus-per-worker {gpus_per_worker}: must be at least 1")
        config.validate()  # before the teacher is imported, the data read or writers started
        # Once, before writers start: it may import the packaged teacher or download a Hub id
        # (to its snapshot folder, which carries the commit into the key).
        config.teacher = resolve_teacher(config.teacher, config.revision)
        if workers > 1:
            config.validate()  # again, now that the teacher's folder (its vocabulary) is known
            from .cache import cache_info
            from .launch import launch_writers

            argv = sys.argv[sys.argv.index("cache") + 1 :]
            from .hub import hub_origin

            origin = hub_origin(config.teacher)
            if origin is not None:  # every writer on the commit resolved here, even if the branch moves meanwhile
                argv += ["--revision", origin[1]]
            tp = int(config.engine_args.get("tensor_parallel_size", 1) or 1)
            location = launch_writers(argv, workers, config.shard, gpus_per_worker or tp)
            info = cache_info(location)
            state = "complete" if info["complete"] else f"{info['units_done']}/{info['units_total']} units done (other --shard writers still to run)"
            click.echo(f"{workers} writers finished: {location} {state}", err=True)
            click.echo(json.dumps(info, indent=2) if as_json else location)
            return
        summary = build_cache(config).summary()
        _print_summary(summary)
        click.echo(json.dumps(summary, indent=2) if as_json else summary["location"])

    _run(go)


@main.command(cls=_ConfigCommand, config=".distill:DistillConfig")
@click.option("--config", "config_path", default=None, help="YAML recipe with DistillConfig fields; options given here override it.")
@click.pass_context
def distill(ctx: click.Context, config_path: str | None, **_: Any) -> None:
    """Train a student from teacher caches with HPD or a baseline loss."""
    from .config import build, flag_of
    from .distill import DistillConfig, train

    def go() -> None:
        values = _recipe_and_flags(ctx, config_path)
        for f in dataclasses.fields(DistillConfig):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and not values.get(f.name):
                raise HPDError(f"{flag_of(DistillConfig, f.name)}: required (on the command line or in --config)")
        config = build(DistillConfig, values, where=f"--config {config_path}" if config_path else "distill options")
        last = train(config)
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 reports for all
            click.echo(json.dumps(last, indent=2), err=True)
            click.echo(str(Path(config.out) / "final"))

    _run(go)


@main.command()
@click.argument("cache_path")
def info(cache_path: str) -> None:
    """Attributes and stats of a cache (a folder or URL), as JSON."""
    from .cache import cache_info

    _run(lambda: click.echo(json.dumps(cache_info(cache_path), indent=2)))


@main.command()
@click.argument("cache_path")
def verify(cache_path: str) -> None:
    """Read every chunk of a cache (a folder or URL) and check it against the cache contract (exit 1 on a violation)."""
    from .cache import verify_cache
    from .errors import CacheCorruptError

    def go() -> None:
        try:
            report = verify_cache(cache_path)
        except CacheCorruptError as exc:
            click.echo(f"verify failed: {exc}", err=True)
            _finish(1)
        click.echo(json.dumps(report.as_dict(), indent=2))
        if not report.complete:
            claimed = f", {report.units_claimed} claimed by a writer that is running or stopped" if report.units_claimed else ""
            click.echo(f"verify: cache is incomplete ({report.units_checked}/{report.units_total} units written, all of them valid{claimed}); rerun the cache command to finish it", err=True)
            _finish(1)
        click.echo(f"ok: {report.units_checked} units, {report.positions} positions", err=True)

    _run(go)


@main.command()
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", default="curves.png", show_default=True, help="The figure: .png, .pdf or .svg.")
@click.option("--title", default=None, help="The figure's title (default: the runs' names and losses).")
def plot(runs: tuple[str, ...], out: str, title: str | None) -> None:
    """Draw the loss, eval and on-policy curves of distill runs (their --out folders) on one figure."""
    from .plot import plot_runs

    _run(lambda: click.echo(str(plot_runs(list(runs), out, title))))


@main.command(name="list")
@click.option("--root", default=None, help="Cache root, a folder or URL (default: $HPD_CACHE_HOME or the user cache dir).")
@click.option("--json", "as_json", is_flag=True)
def list_(root: str | None, as_json: bool) -> None:
    """The caches under the cache root."""
    from .cache import list_caches

    def go() -> None:
        rows = list_caches(root)
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        click.echo(f"{'key':<32}  {'teacher':<24} {'k':>4} {'tokens':>10} {'size':>10}  {'state':<10} data")
        for r in rows:
            click.echo(f"{r['key']:<32}  {r['teacher'][:24]:<24} {r['k']:>4} {r['tokens']:>10} {_size(r['bytes']):>10}  {'damaged' if r.get('damaged') else 'complete' if r['complete'] else 'partial':<10} {r['data']}")

    _run(go)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@main.command(name="import-gguf")
@click.argument("gguf", required=False)
@click.option("--out", required=False, help="Output folder (default: under the cache root).")
def import_gguf_cmd(gguf: str | None, out: str | None) -> None:
    """Convert a GGUF teacher to a Hugging Face folder that transformers and vLLM load.

    Without GGUF, imports the packaged SmolLM2-135M-Instruct.
    """
    from .models import default_teacher_dir, import_gguf, packaged_gguf

    def go() -> None:
        source = Path(gguf) if gguf else packaged_gguf()
        target = Path(out) if out else default_teacher_dir().parent / (source.stem.split(".")[0].lower() if gguf else DEFAULT_TEACHER)
        target.parent.mkdir(parents=True, exist_ok=True)
        click.echo(str(import_gguf(source, target)))

    _run(go)


@main.command()
@click.option("--teacher", default=DEFAULT_TEACHER, show_default=True, help="Teacher: a model folder, a Hugging Face Hub id (org/name), or the packaged teacher's name.")
@click.option("--revision", default=None, help="The Hub teacher's branch, tag or commit (default: its default branch).")
@click.option("--data", "data_path", required=True, help="Prompts: {\"prompt\"}, chat or ShareGPT records (a trailing assistant turn is regenerated); a file, dataset folder or Hub dataset id.")
@click.option("--data-split", default=None, help="Split of a dataset folder or Hub dataset (default: train).")
@click.option("--data-config", default=None, help="Configuration of a dataset folder or Hub dataset.")
@click.option("--out", required=True, help="JSONL of chat records with the teacher's responses.")
@click.option("--n", default=1, show_default=True, help="Responses per prompt.")
@click.option("--temperature", default=0.7, show_default=True)
@click.option("--top-p", default=0.95, show_default=True)
@click.option("--max-new-tokens", default=256, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--engine", type=click.Choice(["vllm", "hf"]), default="vllm", show_default=True)
def generate(teacher: str, revision: str | None, data_path: str, data_split: str | None, data_config: str | None, out: str, n: int, temperature: float,
             top_p: float, max_new_tokens: int, seed: int, engine: str) -> None:
    """Sample responses from the teacher for prompt-only records (the off-policy data)."""
    from .generate import GenerateConfig, generate_responses
    from .models import resolve_teacher

    def go() -> None:
        summary = generate_responses(GenerateConfig(teacher=resolve_teacher(teacher, revision), data=data_path, data_split=data_split, data_config=data_config,
                                                    out=out, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, engine=engine))
        click.echo(json.dumps(summary), err=True)
        click.echo(summary["out"])

    _run(go)


@main.command()
@click.option("--teacher", default=DEFAULT_TEACHER, show_default=True, help="Teacher: a model folder, a Hugging Face Hub id (org/name), or the packaged teacher's name.")
@click.option("--revision", default=None, help="The Hub teacher's branch, tag or commit (default: its default branch).")
@click.option("--keep", required=True, help="Decoder layers to keep, e.g. 0,6,12,18,24,29 or 0-3,29.")
@click.option("--out", required=True, help="Student folder to write.")
def prune(teacher: str, revision: str | None, keep: str, out: str) -> None:
    """Make a student by depth pruning: keep some of the teacher's layers, its embeddings and tokenizer."""
    from .models import parse_layers, prune_layers, resolve_teacher

    _run(lambda: click.echo(str(prune_layers(resolve_teacher(teacher, revision), out, parse_layers(keep)))))


@main.command()
@click.option("--config", "config_path", default="recipes/smollm2-135m/pipeline.yaml", show_default=True, help="PipelineConfig YAML.")
@click.option("--out", default=None, help="Run folder (overrides the recipe's).")
@click.option("--max-steps", type=int, default=None, help="Distill steps (overrides the recipe's distill.max_steps).")
@click.option("--teacher", default=None, help="Teacher (overrides the recipe's): a model folder, a Hugging Face Hub id, or the packaged teacher's name.")
@click.option("--revision", default=None, help="The Hub teacher's branch, tag or commit (overrides the recipe's).")
def pipeline(config_path: str, out: str | None, max_steps: int | None, teacher: str | None, revision: str | None) -> None:
    """The whole recipe: import teacher, prune student, generate, cache, distill, evaluate."""
    from .config import build, load_yaml
    from .pipeline import PipelineConfig, run_pipeline

    def go() -> None:
        values = load_yaml(config_path) if Path(config_path).exists() or config_path != "recipes/smollm2-135m/pipeline.yaml" else {}
        if out:
            values["out"] = out
        if max_steps is not None:
            values.setdefault("distill", {})["max_steps"] = max_steps
        for name, value in (("teacher", teacher), ("revision", revision)):
            if value is not None:
                values[name] = value
        config = build(PipelineConfig, values, where=f"--config {config_path}")
        report = run_pipeline(config)
        click.echo((Path(config.out) / "report.md").read_text(), err=True)
        click.echo(str(Path(config.out) / "report.json"))
        del report

    _run(go)


@main.command()
@click.option("--data", "data_path", default=DEFAULT_DATA, show_default=True)
@click.option("--engine", type=click.Choice(["vllm", "hf"]), default="vllm", show_default=True)
def demo(data_path: str, engine: str) -> None:
    """The cache stage alone on the embedded default: import the packaged teacher, cache the bundled data, verify."""
    from .cache import CacheConfig, build_cache, cache_info, verify_cache
    from .models import resolve_teacher

    def go() -> None:
        teacher = resolve_teacher(DEFAULT_TEACHER)
        click.echo(f"teacher: {teacher}", err=True)
        summary = build_cache(CacheConfig(teacher=teacher, data=data_path, engine=engine)).summary()
        _print_summary(summary)
        report = verify_cache(summary["location"])
        info_ = cache_info(summary["location"])
        click.echo(f"verify: ok ({report.units_checked} units, {report.label_in_topk} labels checked against their top-k entry)", err=True)
        click.echo(f"storage: {info_['bytes_per_response_token']} bytes/response token, mean |KL distortion| {info_['mean_abs_kl_distortion']:.2e} nats", err=True)
        click.echo(summary["location"])

    _run(go)


if __name__ == "__main__":
    main()
