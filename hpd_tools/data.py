"""Reading training records and turning them into token sequences with a loss mask.

Records are chat (a list of ``{"role", "content"}`` messages, where the
assistant turns are the response), ShareGPT conversations, or
``prompt``/``response`` pairs. A message's content is a string or OpenAI-style
parts, ``[{"type": "text", "text": ...}, ...]``, whose texts are joined with
nothing between them (as chat templates that take parts render them); a part of
any other type (an image, audio) stops the run with one line naming the record
and the type: a text teacher would be scored on a conversation it never saw.

ShareGPT records (common in distillation datasets) hold ``conversations``
(``Fields.conversations``), a list of ``{"from", "value"}`` turns; ``from`` maps
to a role through ``SHAREGPT_ROLES``: ``system`` -> system, ``human`` and
``user`` -> user, ``gpt``, ``chatgpt`` and ``assistant`` -> assistant, ``tool``
-> tool. Any other ``from`` is a bad record. A record with ``messages`` is read
as chat even when it also has ``conversations``.

``--data`` is a file (JSONL, JSON, Parquet), a folder written by
``datasets.Dataset.save_to_disk``, a dataset repository folder (data files as
the Hub lays them out, e.g. ``data/train-*.parquet`` or ``train.jsonl``, read
by ``datasets.load_dataset`` streaming, without an Arrow copy), or a Hub dataset
id (``datasets.load_dataset``: its cache, ``HF_DATASETS_OFFLINE``). Folders and
Hub datasets have splits: ``split`` (default ``train``) picks one, and
``data_config`` a repository's configuration. ``max_records`` reads only the
first records. The cache key covers what was read: it hashes the records kept,
after normalisation (``example_id``).

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
    conversations: str = "conversations"  # ShareGPT: [{"from", "value"}, ...]


# ShareGPT's "from" values and the roles they are read as.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
                  "assistant": "assistant", "tool": "tool"}


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
    source: str = ""  # what was read: a resolved path or a Hub dataset id
    split: str | None = None  # the split of a folder or Hub dataset (None: a file)
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


class _FatalRow(_BadRow):
    """A row-level problem that stops the run even without strict (content of a kind no text teacher reads)."""


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


# Data files a dataset repository folder may hold (datasets' packaged loaders for them),
# compressed or not.
_REPO_DATA = (".jsonl", ".json", ".parquet", ".arrow")
_COMPRESSED = ("", ".gz", ".zst", ".xz", ".bz2")


def _is_saved_dataset(names: set[str]) -> bool:
    import datasets

    return ({datasets.config.DATASET_INFO_FILENAME, datasets.config.DATASET_STATE_JSON_FILENAME} <= names
            or datasets.config.DATASETDICT_JSON_FILENAME in names)


def _has_data_files(path: Path) -> bool:
    """A dataset repository: data files anywhere below (not in hidden folders), or a README declaring configs."""
    readme = path / "README.md"
    if readme.is_file() and re.search(r"^configs:", readme.read_text(errors="replace").split("\n---", 1)[0], re.MULTILINE):
        return True
    suffixes = tuple(data + comp for data in _REPO_DATA for comp in _COMPRESSED)
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(name.lower().endswith(suffixes) for name in files):
            return True
    return False


def _choose_split(splits: list[str], split: str | None, where: str) -> str:
    if split is not None:
        if split not in splits:
            raise DataError(f"--data-split {split}: {where} has no such split (its splits: {', '.join(splits)}); choose one of them")
        return split
    if "train" not in splits:
        raise DataError(f"{where}: dataset has splits {sorted(splits)} but no 'train'; choose one with --data-split")
    return "train"


def _folder_rows(path: Path, split: str | None = None, chosen: list[str] | None = None) -> Iterator[tuple[int, Any]]:
    """Rows of a folder written by ``datasets`` ``save_to_disk`` (``split``, default
    "train", of a DatasetDict). The split read is appended to ``chosen``."""
    try:
        names = {p.name for p in path.iterdir()}
    except OSError as exc:
        raise DataError(f"{path}: cannot list the folder ({exc.strerror or _one_line(exc)}); check its permissions") from None
    import datasets
    import pyarrow as pa

    if not _is_saved_dataset(names):
        raise DataError(
            f"{path}: a folder, but not a saved `datasets` folder (no {datasets.config.DATASET_STATE_JSON_FILENAME} or "
            f"{datasets.config.DATASETDICT_JSON_FILENAME}) and no dataset repository (no .jsonl, .json or .parquet data files in it); "
            "give a JSONL, JSON or Parquet file, a dataset folder, or a folder written by save_to_disk"
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
        name = _choose_split(list(ds), split, str(path))
        ds = ds[name]
        if chosen is not None:
            chosen.append(name)
    elif split is not None:
        raise DataError(f"--data-split {split}: {path} is a saved dataset of one split, with no split to choose; drop --data-split")
    row = 0
    try:
        for record in ds:
            yield row, record
            row += 1
    except damaged as exc:
        raise DataError(f"{path}: the saved `datasets` folder is damaged near row {row} ({type(exc).__name__}: {_one_line(exc)}); save the dataset again") from None


def _repo_rows(path: Path, split: str | None, data_config: str | None, chosen: list[str]) -> Iterator[tuple[int, Any]]:
    """Rows of a dataset repository folder, streamed by ``datasets.load_dataset``."""
    import datasets

    try:
        loaded = datasets.load_dataset(str(path), name=data_config, streaming=True)
    except ValueError as exc:
        if "BuilderConfig" in str(exc) or "config" in str(exc).lower():
            raise DataError(f"--data-config {data_config}: {path} has no such configuration ({_one_line(exc)})") from None
        raise DataError(f"{path}: not a readable dataset folder ({_one_line(exc)}); check its data files") from None
    except Exception as exc:  # datasets raises many types for a folder it cannot read (no files, mixed formats)
        raise DataError(f"{path}: not a readable dataset folder ({type(exc).__name__}: {_one_line(exc)}); check its data files") from None
    name = _choose_split(list(loaded), split, str(path))
    chosen.append(name)
    yield from _dataset_rows(loaded[name], str(path))


def _dataset_rows(ds: Any, where: str) -> Iterator[tuple[int, Any]]:
    row = 0
    try:
        for record in ds:
            yield row, record
            row += 1
    except Exception as exc:  # a data file that does not parse: datasets and pyarrow raise many types
        raise DataError(f"{where}: cannot read the dataset near row {row} ({type(exc).__name__}: {_one_line(exc)}); fix or remove that data file") from None


def _hub_offline() -> bool:
    import datasets

    truthy = {"1", "ON", "YES", "TRUE"}
    return (os.environ.get("HF_DATASETS_OFFLINE", "").upper() in truthy or os.environ.get("HF_HUB_OFFLINE", "").upper() in truthy
            or bool(datasets.config.HF_HUB_OFFLINE))


def _hub_rows(name: str, split: str | None, data_config: str | None, chosen: list[str]) -> Iterator[tuple[int, Any]]:
    """Rows of a Hub dataset through ``datasets.load_dataset`` (downloaded once into its cache)."""
    import datasets

    missing = f"--data {name}: no such file or folder, and"
    try:
        loaded = datasets.load_dataset(name, name=data_config)
    except ValueError as exc:
        if "BuilderConfig" in str(exc) or "config" in str(exc).lower():
            raise DataError(f"--data-config {data_config}: the Hub dataset {name} has no such configuration ({_one_line(exc)})") from None
        raise DataError(f"--data {name}: the Hub dataset does not load ({_one_line(exc)})") from None
    except datasets.exceptions.DatasetNotFoundError:
        raise DataError(f"{missing} no such dataset on the Hugging Face Hub (or it is private or gated: log in with `hf auth login` or HF_TOKEN)") from None
    except ConnectionError:
        if _hub_offline():
            raise DataError(f"{missing} the Hub dataset {name} is not in the datasets cache while HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set; "
                            "load it once with network access, set HF_HOME to the cache that holds it, or give a data file or folder") from None
        raise DataError(f"{missing} the Hugging Face Hub cannot be reached to load the dataset {name}; check the network, or give a data file or folder") from None
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({"train": loaded})
    split_name = _choose_split(list(loaded), split, f"the Hub dataset {name}")
    chosen.append(split_name)
    yield from _dataset_rows(loaded[split_name], name)


_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")


def _looks_like_hub_id(spec: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if spec.count("/") > 1 or spec.lower().endswith(_FILE_SUFFIXES + (".csv", ".txt")):
        return False
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


class DataSource:
    """What ``--data`` names, opened: its rows, how to name a row, what was read.

    A path that exists is a file, a saved ``datasets`` folder or a dataset
    repository folder; a name that is no path but a valid Hub id is a Hub
    dataset. ``split`` and ``data_config`` apply to folders and Hub datasets.
    """

    def __init__(self, spec: str | Path, split: str | None = None, data_config: str | None = None):
        self.spec, self.split, self.data_config = str(spec), split, data_config
        self.path = Path(spec)
        self.chosen: list[str] = []
        self.hub = not os.path.lexists(self.path) and _looks_like_hub_id(self.spec)
        if not self.hub:
            check_data_path(self.path)
            if self.path.is_dir():
                names = {p.name for p in self.path.iterdir()} if os.access(self.path, os.R_OK | os.X_OK) else set()
                if "config.json" in names and any(n.endswith((".safetensors", ".bin", ".gguf")) for n in names):
                    raise DataError(f"--data {self.path}: a model folder (config.json and weights), not a saved `datasets` folder or a dataset "
                                    "repository; give the data: a JSONL, JSON or Parquet file, or a dataset folder")
                if "zarr.json" in names:  # its metadata files are JSON: never read them as records
                    raise DataError(f"--data {self.path}: a Zarr store (an hpd-tools cache), not data; give the records the cache was made from "
                                    "(distill takes caches with --cache)")
                self.repo = not _is_saved_dataset(names) and _has_data_files(self.path)
            else:
                self.repo = False
                for option, value in (("--data-split", split), ("--data-config", data_config)):
                    if value is not None:
                        raise DataError(f"{option} {value}: --data {self.path} is a single file, with no splits or configurations; "
                                        f"drop {option}, or give a dataset folder or Hub id")
            if data_config is not None and not self.repo and self.path.is_dir():
                raise DataError(f"--data-config {data_config}: {self.path} is a saved `datasets` folder, with no configurations; drop --data-config")
        self.source = self.spec if self.hub else str(self.path.resolve())
        # JSONL rows are line numbers; everything else counts rows from 0.
        self.row_word = "line" if not self.hub and self.path.is_file() and self.path.suffix.lower() in (".jsonl", ".ndjson") else "row"

    def rows(self) -> Iterator[tuple[int, Any]]:
        if self.hub:
            return _hub_rows(self.spec, self.split, self.data_config, self.chosen)
        if self.repo:
            return _repo_rows(self.path, self.split, self.data_config, self.chosen)
        if self.path.is_dir():
            return _folder_rows(self.path, self.split, self.chosen)
        return _iter_rows(self.path)

    @property
    def split_read(self) -> str | None:
        return self.chosen[0] if self.chosen else None


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


def content_text(content: Any, j: int) -> str:
    """A message's content as text: a string, or the joined texts of OpenAI-style parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _BadRow(f"message {j} content is {type(content).__name__}, not a string (nor a list of text parts)")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            shown = repr(kind) if kind is not None else f"missing ({type(part).__name__} part)"
            raise _FatalRow(f"message {j} has a content part of type {shown}; only text parts ({{\"type\": \"text\", \"text\": ...}}) are read, "
                            "so remove such parts or records (a text teacher cannot score them)")
        if not isinstance(part.get("text"), str):
            raise _BadRow(f"message {j} has a text part without a string 'text'")
        texts.append(part["text"])
    return "".join(texts)


def chat_messages(record: dict[str, Any], fields: Fields) -> list[dict[str, str]] | None:
    """The record's turns as ``{"role", "content"}`` messages, from ``fields.messages``
    or ShareGPT ``fields.conversations``; None when it has neither. Raises _BadRow."""
    if record.get(fields.messages) is not None:
        name, role_key, text_key, roles = fields.messages, "role", "content", {r: r for r in ROLES}
    elif record.get(fields.conversations) is not None:
        name, role_key, text_key, roles = fields.conversations, "from", "value", SHAREGPT_ROLES
    else:
        return None
    turns = record[name]
    if not isinstance(turns, list) or not turns:
        raise _BadRow(f"field '{name}' is not a non-empty list of messages")
    out = []
    for j, m in enumerate(turns):
        if not isinstance(m, dict) or role_key not in m or text_key not in m:
            raise _BadRow(f"message {j} lacks '{role_key}' or '{text_key}'")
        if m[role_key] not in roles:
            raise _BadRow(f"message {j} has unknown role {m[role_key]!r}")
        out.append({"role": roles[m[role_key]], "content": content_text(m[text_key], j)})
    return out


def normalise_record(record: Any, fields: Fields) -> list[dict[str, str]]:
    """Turn a raw record into a list of chat messages, or raise _BadRow."""
    record = as_object(record)
    out = chat_messages(record, fields)
    if out is not None:
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
    split: str | None = None,
    data_config: str | None = None,
    max_records: int = 0,
) -> tuple[list[Example], DataReport]:
    """Read, validate and tokenise every record of ``path`` (a file, a folder or a
    Hub dataset id: :class:`DataSource`), or its first ``max_records`` (0: all).

    Over-long records are cut to ``max_length`` tokens (counted as truncated);
    a record whose response starts after the cut is skipped.
    """
    data = DataSource(path, split, data_config)
    path = data.path if not data.hub else Path(data.spec)
    tokenise = Tokenise(tokenizer)
    report = DataReport(path=data.spec, source=data.source)
    examples: list[Example] = []
    for row, record in data.rows():
        if max_records and report.rows >= max_records:
            break
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
            where = f"{data.row_word} {row}"
            if isinstance(bad, _FatalRow):
                raise DataError(f"{data.spec} {where}: {bad}") from None
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
    report.split = data.split_read
    if not examples:
        raise DataError(f"{data.spec}: no usable records, nothing to cache: {_why_nothing(path, report)}")
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
