"""Reading training records and turning them into token sequences with a loss mask.

Records are either chat (a list of ``{"role", "content"}`` messages, where the
assistant turns are the response) or ``prompt``/``response`` pairs. Files are
JSONL, JSON, Parquet or a folder written by ``datasets.Dataset.save_to_disk``.

Only response tokens carry a training signal. A bad record is skipped and
counted, or with ``strict`` stops the run with a one-line error naming the file
and row.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import DataError
from .hashing import sha256_hex, stable_json

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Fields:
    """Names of the record fields; override them when a dataset spells them differently."""

    messages: str = "messages"
    prompt: str = "prompt"
    response: str = "response"


@dataclass
class Example:
    """One tokenised record.

    ``response[j]`` is True when token j belongs to an assistant turn.
    """

    example_id: int  # uint64, hash of the normalised record
    tokens: np.ndarray  # int32 [L]
    response: np.ndarray  # bool [L]
    row: int


@dataclass
class DataReport:
    """What reading the data did: rows read, kept, skipped (by reason), truncated."""

    path: str
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_rows: dict[str, list[int]] = field(default_factory=dict)

    def skip(self, reason: str, row: int) -> None:
        self.skipped[reason] += 1
        self.first_rows.setdefault(reason, [])
        if len(self.first_rows[reason]) < 5:
            self.first_rows[reason].append(row)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "kept": self.kept,
            "truncated": self.truncated,
            "skipped": {
                reason: {"count": n, "first_rows": self.first_rows[reason]}
                for reason, n in sorted(self.skipped.items())
            },
        }


class _BadRow(Exception):
    """A row-level problem; becomes a skip or, with strict, a DataError."""


def _iter_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (row number, raw record). Rows of JSONL are line numbers (1-based)."""
    suffix = path.suffix.lower()
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:  # datasets raises several types for a foreign folder
            raise DataError(f"{path}: not a saved `datasets` folder ({exc}); give a JSONL, JSON or Parquet file") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path}: dataset has splits {sorted(ds)} but no 'train'; save the split to use on its own")
            ds = ds["train"]
        for i, record in enumerate(ds):
            yield i, record
    elif suffix in (".jsonl", ".ndjson"):
        with path.open("r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield lineno, _BadRow(f"malformed JSON ({exc.msg} at column {exc.colno})")
    elif suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); fix the file or convert it to JSONL, one record per line") from None
        if isinstance(records, dict):
            records = records.get("data", records.get("records"))
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records (or {{\"data\": [...]}})")
        yield from enumerate(records)
    elif suffix == ".parquet":
        import datasets

        ds = datasets.Dataset.from_parquet(str(path))
        for i, record in enumerate(ds):
            yield i, record
    else:
        raise DataError(f"{path}: unknown data format '{suffix}'; use .jsonl, .json, .parquet or a saved datasets folder")


def as_object(record: Any) -> dict[str, Any]:
    """The raw record as a mapping, or _BadRow (a row that did not parse, or not an object)."""
    if isinstance(record, _BadRow):
        raise record
    if not isinstance(record, dict):
        raise _BadRow(f"record is a {type(record).__name__}, not an object")
    return record


def normalise_record(record: Any, fields: Fields) -> list[dict[str, str]]:
    """Turn a raw record into a list of chat messages, or raise _BadRow."""
    record = as_object(record)
    if record.get(fields.messages) is not None:
        messages = record[fields.messages]
        if not isinstance(messages, list) or not messages:
            raise _BadRow(f"field '{fields.messages}' is not a non-empty list of messages")
        out = []
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise _BadRow(f"message {j} lacks 'role' or 'content'")
            if m["role"] not in ROLES:
                raise _BadRow(f"message {j} has unknown role {m['role']!r}")
            if not isinstance(m["content"], str):
                raise _BadRow(f"message {j} content is {type(m['content']).__name__}, not a string")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise _BadRow("no assistant message (nothing to learn from)")
        if any(m["role"] == "assistant" and not m["content"].strip() for m in out):
            raise _BadRow("empty response")
        return out
    if fields.prompt in record or fields.response in record:
        for name in (fields.prompt, fields.response):
            if name not in record or record[name] is None:
                raise _BadRow(f"missing field '{name}'")
            if not isinstance(record[name], str):
                raise _BadRow(f"field '{name}' is {type(record[name]).__name__}, not a string")
        if not record[fields.response].strip():
            raise _BadRow("empty response")
        return [
            {"role": "user", "content": record[fields.prompt]},
            {"role": "assistant", "content": record[fields.response]},
        ]
    raise _BadRow(f"missing fields: neither '{fields.messages}' nor '{fields.prompt}'/'{fields.response}'")


def example_id(messages: list[dict[str, str]]) -> int:
    """Stable uint64 id of a normalised record (first 8 bytes of its SHA-256)."""
    return int(sha256_hex(stable_json(messages))[:16], 16)


class Tokenise:
    """Turns normalised messages into (tokens, response) with the teacher's tokenizer.

    With a chat template the conversation is rendered by it; each assistant
    turn is the text between the rendering of the preceding turns with the
    generation prompt and the rendering that includes the turn, cut after the
    end-of-sequence token. Segments are tokenised one by one, as a model sees
    them when it generates. Without a template, records are prompt + response:
    the prompt with the tokenizer's special tokens, then the response and EOS.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def segments(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        if not self.has_template:
            if len(messages) != 2 or [m["role"] for m in messages] != ["user", "assistant"]:
                raise _BadRow("multi-turn chat needs a tokenizer with a chat template")
            return [(messages[0]["content"], False), (messages[1]["content"], True)]
        render = self.tokenizer.apply_chat_template
        segments: list[tuple[str, bool]] = []
        done = ""
        eos = self.tokenizer.eos_token or ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            full = render(messages[: i + 1], tokenize=False)
            if i:
                head = render(messages[:i], tokenize=False, add_generation_prompt=True)
            else:  # a conversation that opens with the assistant: its header is prompt
                at = full.find(m["content"])
                head = full[:at] if at >= 0 else ""
            if not head.startswith(done) or not full.startswith(head):
                raise _BadRow("the chat template does not render turns as prefixes of each other")
            turn = full[len(head):]
            cut = turn.rfind(eos) + len(eos) if eos and eos in turn else len(turn)
            segments.append((head[len(done):], False))
            segments.append((turn[:cut], True))
            done = head + turn[:cut]
        return segments

    def __call__(self, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
        tokens: list[int] = []
        response: list[bool] = []
        segments = self.segments(messages)
        for j, (text, is_response) in enumerate(segments):
            ids = self._encode(text)
            if j == 0 and not self.has_template:
                ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
            tokens.extend(ids)
            response.extend([is_response] * len(ids))
        if not self.has_template and self.tokenizer.eos_token_id is not None:
            tokens.append(self.tokenizer.eos_token_id)
            response.append(True)
        return tokens, response


def read_examples(
    path: str | Path,
    tokenizer: Any,
    *,
    max_length: int,
    fields: Fields = Fields(),
    strict: bool = False,
) -> tuple[list[Example], DataReport]:
    """Read, validate and tokenise every record of ``path``.

    Over-long records are cut to ``max_length`` tokens (counted as truncated);
    a record whose response starts after the cut is skipped.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"--data {path}: no such file or folder")
    tokenise = Tokenise(tokenizer)
    report = DataReport(path=str(path))
    examples: list[Example] = []
    for row, record in _iter_rows(path):
        report.rows += 1
        try:
            messages = normalise_record(record, fields)
            tokens, response = tokenise(messages)
            if len(tokens) > max_length:
                tokens, response = tokens[:max_length], response[:max_length]
                if not any(response[1:]):
                    raise _BadRow(f"prompt is longer than --max-length {max_length}")
                report.truncated += 1
            if not any(response[1:]):
                raise _BadRow("response has no tokens after tokenisation")
        except _BadRow as bad:
            where = f"line {row}" if path.suffix.lower() in (".jsonl", ".ndjson") else f"row {row}"
            if strict:
                raise DataError(f"{path} {where}: {bad}; fix or remove the record, or run without --strict to skip bad rows") from None
            report.skip(str(bad).split(" (")[0], row)
            continue
        examples.append(
            Example(
                example_id=example_id(messages),
                tokens=np.asarray(tokens, dtype=np.int32),
                response=np.asarray(response, dtype=bool),
                row=row,
            )
        )
        report.kept += 1
    if not examples:
        raise DataError(f"{path}: no usable records ({report.rows} rows read, {sum(report.skipped.values())} skipped: {dict(report.skipped)})")
    return examples, report
