"""Content hashes that identify a teacher, a tokenizer and a chat template.

A cache's key is built from these, so they must depend on content, never on a
file's path or modification time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

# Weight files are hashed by sampling: their size, the safetensors header (names,
# shapes, dtypes and offsets of every tensor) and blocks spread over the file.
# Reading a 140 GB checkpoint whole on every run would cost minutes; a change to
# any tensor's shape, a retrain or a requantisation changes the sampled bytes.
_SAMPLE_BLOCKS = 16
_BLOCK_BYTES = 1 << 16
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_CONFIG_FILES = ("config.json", "generation_config.json")


def stable_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, the canonical form that is hashed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def hash_obj(obj: Any) -> str:
    return sha256_hex(stable_json(obj))


def _sample_file(path: Path, digest: "hashlib._Hash") -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        if path.suffix == ".safetensors":
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header_len, 1 << 26)))
        step = max(size // _SAMPLE_BLOCKS, 1)
        for offset in range(0, size, step):
            f.seek(offset)
            digest.update(f.read(_BLOCK_BYTES))


def model_hash(model_dir: str | os.PathLike) -> str:
    """Hash of a model folder's config and (sampled) weight files."""
    root = Path(model_dir)
    digest = hashlib.sha256()
    for name in _CONFIG_FILES:
        if (root / name).is_file():
            config = json.loads((root / name).read_text())
            # Where the weights were loaded from does not change them.
            config.pop("_name_or_path", None)
            config.pop("transformers_version", None)
            digest.update(stable_json(config).encode())
    for path in sorted(p for p in root.iterdir() if p.suffix in _WEIGHT_SUFFIXES):
        _sample_file(path, digest)
    return digest.hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    """Hash of a tokenizer's vocabulary, merges, normalisation and special tokens.

    Two tokenizers with the same hash turn every text into the same ids. The
    chat template is hashed separately (:func:`chat_template_hash`).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Truncation/padding settings are runtime state, not vocabulary.
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = {"vocab": sorted(tokenizer.get_vocab().items())}
    spec["special"] = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "add_bos": bool(getattr(tokenizer, "add_bos_token", False)),
    }
    return hash_obj(spec)


def chat_template_hash(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    if isinstance(template, dict):
        return hash_obj(template)
    return sha256_hex(template)
