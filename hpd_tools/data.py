"""Reading training records and turning them into token sequences with a loss mask.

Records are either chat (a list of ``{"role", "content"}`` messages, where the
assistant turns are the response) or ``prompt``/``response`` pairs. Files are
JSONL, JSON, Parquet or a folder written by ``datasets.Dataset.save_to_disk``.

Text files are UTF-8 (a leading byte-order mark is dropped) or UTF-16/UTF-32,
told by their BOM or, without one, by JSON's own rule on the zero bytes around
the first characters. Parquet is streamed with pyarrow.

Only response tokens carry a training signal. A bad record (malformed JSON, a
line that is not valid UTF-8, missing fields) is skipped and counted, or with
``strict`` stops the run with a one-line error naming the file and row. A file
that cannot be read as a whole (unreadable, compressed, corrupt Parquet, a
damaged ``datasets`` folder, UTF-16 that does not decode) and a file that yields
no usable record stop the run with a one-line error naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import re
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


# Byte signatures of files that are not JSON text (JSON text never starts with these bytes).
_NOT_TEXT = (
    (b"\x1f\x8b", "gzip-compressed", "decompress it first (gunzip)"),
    (b"(\xb5/\xfd", "zstd-compressed", "decompress it first (unzstd)"),
    (b"BZh", "bzip2-compressed", "decompress it first (bunzip2)"),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it first (unxz)"),
    (b"PK\x03\x04", "a zip archive", "unpack it first"),
    (b"PAR1", "a Parquet file", "give it a .parquet name"),
)
_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes that did not decode, under errors="surrogateescape"


def _one_line(exc: BaseException) -> str:
    """A library's error message on one line, short enough to quote."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def _text_encoding(path: Path) -> str:
    """The encoding of a JSON/JSONL file, from its first bytes.

    A byte-order mark (UTF-8, UTF-16, UTF-32) decides; without one, the
    pattern of zero bytes around the first (ASCII) characters does, as JSON's
    RFC 4627 prescribes (``json.detect_encoding``). Compressed files and
    Parquet under a JSON name are refused by their signature.
    """
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or _one_line(exc)}); check that it is a readable file") from None
    for magic, what, todo in _NOT_TEXT:
        if head.startswith(magic):
            raise DataError(f"{path}: the file is {what}, not JSON text; {todo}")
    return json.detect_encoding(head)


def _encoding_name(encoding: str) -> str:
    return {"utf-8-sig": "UTF-8"}.get(encoding, encoding.upper())


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Lines of a JSONL file: (line number, record or _BadRow).

    UTF-8 files (a BOM is dropped) are read with undecodable bytes escaped, so
    a line that is not valid UTF-8 is one bad row naming its byte offset, like
    a line of malformed JSON. UTF-16/32 files are read with their codec; a
    decoding error there stops the read (the stream cannot be resynchronised).
    """
    encoding = _text_encoding(path)
    utf8 = encoding in ("utf-8", "utf-8-sig")
    offset = 3 if encoding == "utf-8-sig" else 0
    lineno = 0
    try:
        with path.open("r", encoding=encoding, errors="surrogateescape" if utf8 else "strict", newline="") as f:
            for lineno, line in enumerate(f, start=1):
                start = offset
                if utf8:
                    raw_len = len(line) if line.isascii() else len(line.encode("utf-8", "surrogateescape"))
                    offset += raw_len
                if line.startswith("\ufeff"):  # files concatenated with their BOMs
                    line, start = line[1:], start + 3
                if not line.strip():
                    continue
                bad = _ESCAPED.search(line) if utf8 and not line.isascii() else None
                if bad:
                    at = start + len(line[: bad.start()].encode("utf-8"))
                    yield lineno, _BadRow(f"not valid UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x} at byte offset {at} of the file; re-encode the file as UTF-8)")
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield lineno, _BadRow(f"malformed JSON ({exc.msg} at column {exc.colno})")
    except UnicodeDecodeError as exc:  # UTF-16/32: find where, reading the file again (only on this error)
        raise DataError(f"{path} {_undecodable_at(path, encoding, exc)}; re-encode the file as UTF-8") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file after line {lineno} ({exc.strerror or _one_line(exc)}); check the file and the disk") from None


def _undecodable_at(path: Path, encoding: str, exc: UnicodeDecodeError, raw: bytes | None = None) -> str:
    """'line L: not valid ENC (byte 0xNN at byte offset N: reason)' for the first undecodable byte of a file.

    A text stream decodes in blocks, so its error does not say where the
    block started; decoding the bytes whole does.
    """
    if raw is None:
        raw = path.read_bytes()
        try:
            raw.decode(encoding)
        except UnicodeDecodeError as whole:
            exc = whole
    line = len(re.findall(r"\r\n|\r|\n", raw[: exc.start].decode(encoding, errors="replace"))) + 1
    return f"line {line}: not valid {_encoding_name(encoding)} (byte 0x{raw[exc.start]:02x} at byte offset {exc.start}: {exc.reason})"


def _json_records(path: Path) -> list[Any]:
    """The records of a JSON file: a list, or an object holding one under "data" or "records"."""
    encoding = _text_encoding(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or _one_line(exc)}); check that it is a readable file") from None
    if not raw.strip():
        return []
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} {_undecodable_at(path, encoding, exc, raw)}; re-encode the file as UTF-8") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); fix the file or convert it to JSONL, one record per line") from None
    if isinstance(records, dict):
        records = records.get("data", records.get("records"))
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records (or {{\"data\": [...]}})")
    return records


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows of a Parquet file, streamed batch by batch with pyarrow (row numbers from 0).

    A file pyarrow cannot read (not Parquet, truncated, a corrupt page) stops
    the read with one line: Parquet damage is per page, not per row.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with path.open("rb") as f:  # Python's own error for an unreadable file; pyarrow then reads it natively
            if not f.read(1):
                return
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or _one_line(exc)}); check that it is a readable file") from None
    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield row, record
                row += 1
    except (pa.ArrowException, OSError, ValueError) as exc:  # ArrowInvalid, ArrowIOError; a string column that is not UTF-8
        where = f" near row {row}" if row else ""
        raise DataError(f"{path}: not a readable Parquet file, corrupt or truncated{where} ({_one_line(exc)}); write the file again") from None


def _folder_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows of a folder written by ``datasets`` ``save_to_disk`` (its "train" split for a DatasetDict)."""
    try:
        names = {p.name for p in path.iterdir()}
    except OSError as exc:
        raise DataError(f"{path}: cannot list the folder ({exc.strerror or _one_line(exc)}); check its permissions") from None
    import datasets
    import pyarrow as pa

    is_dataset = {datasets.config.DATASET_INFO_FILENAME, datasets.config.DATASET_STATE_JSON_FILENAME} <= names
    if not is_dataset and datasets.config.DATASETDICT_JSON_FILENAME not in names:
        raise DataError(
            f"{path}: a folder, but not a saved `datasets` folder (no {datasets.config.DATASET_STATE_JSON_FILENAME} or "
            f"{datasets.config.DATASETDICT_JSON_FILENAME}); give a JSONL, JSON or Parquet file, or a folder written by save_to_disk"
        )
    # What a damaged folder raises: Arrow errors for a truncated or foreign .arrow file, OSError
    # for a missing one, ValueError (JSON, UTF-8, features), KeyError/TypeError/AttributeError for
    # metadata JSON of the wrong shape.
    damaged = (pa.ArrowException, OSError, ValueError, KeyError, TypeError, AttributeError)
    try:
        ds = datasets.load_from_disk(str(path))
    except PermissionError as exc:
        raise DataError(f"{path}: cannot read a file of the saved `datasets` folder ({exc.strerror}: {exc.filename}); check its permissions") from None
    except damaged as exc:
        raise DataError(f"{path}: the saved `datasets` folder is damaged ({type(exc).__name__}: {_one_line(exc)}); save the dataset again") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: dataset has splits {sorted(ds)} but no 'train'; save the split to use on its own")
        ds = ds["train"]
    row = 0
    try:
        for record in ds:
            yield row, record
            row += 1
    except damaged as exc:
        raise DataError(f"{path}: the saved `datasets` folder is damaged near row {row} ({type(exc).__name__}: {_one_line(exc)}); save the dataset again") from None


def _iter_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (row number, raw record or _BadRow). Rows of JSONL are line numbers (1-based).

    An empty file has no rows, whatever its format. A file that cannot be
    read, decoded or parsed as a whole raises a one-line DataError naming it.
    """
    suffix = path.suffix.lower()
    if path.is_dir():
        yield from _folder_rows(path)
    elif suffix not in (".jsonl", ".ndjson", ".json", ".parquet"):
        raise DataError(f"{path}: unknown data format '{suffix}'; use .jsonl, .json, .parquet or a saved datasets folder")
    elif suffix in (".jsonl", ".ndjson"):
        yield from _jsonl_rows(path)
    elif suffix == ".json":
        yield from enumerate(_json_records(path))
    else:
        yield from _parquet_rows(path)


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
    check_data_path(path)
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
        raise DataError(f"{path}: no usable records, nothing to cache: {_why_nothing(path, report)}")
    return examples, report


def _why_nothing(path: Path, report: DataReport) -> str:
    """Why a file gave no records, and what to do: the end of a one-line error."""
    if report.rows == 0:
        if path.is_file() and path.stat().st_size == 0:
            return "the file is empty (0 bytes); check that it was written completely"
        if path.suffix.lower() in (".jsonl", ".ndjson") and not path.is_dir():
            return "the file holds only blank lines (0 rows read); give a file with one JSON record per line"
        return "the dataset has no rows (0 rows read)"
    reasons = "; ".join(
        f"{reason}: {n} (first rows {report.first_rows[reason]})" for reason, n in report.skipped.most_common()
    )
    todo = "fix the records, or run with --strict to stop at the first bad one"
    if set(report.skipped) == {"not valid UTF-8"}:
        todo = "the file is not UTF-8 text: re-encode it as UTF-8, or check that it is the data file"
    return f"all {report.rows} rows read were skipped ({reasons}); {todo}"


def check_data_path(path: Path) -> None:
    """Raise a one-line DataError when ``path`` cannot be the data: missing, a broken link, or under a file."""
    try:
        os.stat(path)
        return
    except PermissionError as exc:  # a folder on the way that may not be searched
        raise DataError(f"--data {path}: cannot be reached ({exc.strerror}); check the permissions of the folders on its path") from None
    except OSError:  # missing, a dangling or looping link, a path through a file
        pass
    if path.is_symlink():
        raise DataError(f"--data {path}: a broken symbolic link (to {path.readlink()}); point it at the data file")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DataError(f"--data {path}: {parent} is a file, not a folder; check the path")
            break
    raise DataError(f"--data {path}: no such file or folder")
