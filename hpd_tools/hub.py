"""Models named by Hugging Face Hub id: resolved to a local snapshot folder and its commit.

Wherever hpd-tools takes a model (``--teacher``, ``--student``, a folder
``--online-teacher``) it takes a folder or a Hub id such as
``Qwen/Qwen2.5-7B-Instruct``. An existing folder wins; any other name that is a
valid repo id goes through ``huggingface_hub.snapshot_download``: its cache
(``HF_HUB_CACHE``, else ``$HF_HOME/hub``), ``HF_HUB_OFFLINE`` (the cache only)
and a revision (a branch, tag or commit; default the repo's default branch).
The result is the snapshot folder ``.../models--org--name/snapshots/<commit>``,
which every engine loads as a plain folder, so nothing downstream resolves the
id again (vLLM and transformers would each pick their own commit).

The folder itself says where it came from (:func:`hub_origin`): the cache key
and the attributes take the repo id and commit from it, so a Hub id and its
snapshot folder given by path make the same cache, and ``main`` moving on to a
new commit makes a new one.

The environment is read at each call, not at import: a library caller that
sets ``HF_HOME`` or ``HF_HUB_OFFLINE`` after importing hpd-tools is honoured.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .errors import HPDError

log = logging.getLogger(__name__)

_COMMIT = re.compile(r"[0-9a-f]{40}")
# Files no engine loads: the original (non-transformers) checkpoints that some
# repos carry beside the converted one, and other frameworks' weights. Without
# this, a Llama repo downloads its weights twice.
_IGNORE = ["original/*", "*.pth", "*.msgpack", "*.h5", "*.ot", "*.onnx", "*.onnx_data", "onnx/*", "*.tflite", "coreml/*", "openvino/*", "*.gguf"]
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> Path:
    """huggingface_hub's model cache as the environment names it now."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def hub_origin(folder: str | os.PathLike) -> tuple[str, str] | None:
    """(repo id, commit) of a folder that is a snapshot in huggingface_hub's cache
    layout (``models--org--name/snapshots/<commit>``), else None."""
    path = Path(folder).absolute()
    repo = path.parent.parent.name
    if path.parent.name != "snapshots" or not repo.startswith("models--") or not _COMMIT.fullmatch(path.name):
        return None
    return repo.removeprefix("models--").replace("--", "/"), path.name


def _ref_commit(storage: Path, revision: str) -> str | None:
    """The commit ``revision`` names in a cached repo: itself when a commit, else what refs/ records."""
    if _COMMIT.fullmatch(revision):
        return revision
    try:
        return (storage / "refs" / revision).read_text().strip()
    except (OSError, ValueError):
        return None


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return name.count("/") <= 1


def _cached_refs(storage: Path) -> list[str]:
    refs = storage / "refs"
    names = sorted(str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []
    snapshots = sorted(p.name for p in (storage / "snapshots").iterdir()) if (storage / "snapshots").is_dir() else []
    return names + [s[:12] for s in snapshots]


def resolve_model(name: str, revision: str | None = None, flag: str = "--teacher", *,
                  cache_dir: str | os.PathLike | None = None, offline: bool | None = None) -> tuple[Path, str | None]:
    """The local folder of ``name`` (a model folder or a Hub id) and its commit
    (None for a folder outside the Hub cache). Raises a one-line HPDError naming
    ``flag`` when ``name`` is neither, when a Hub id is not cached while offline,
    or when ``revision`` does not exist. ``cache_dir`` and ``offline`` default to
    the environment's (``HF_HOME``/``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``)."""
    path = Path(name).expanduser()
    if path.is_dir():
        origin = hub_origin(path)
        if revision is not None and origin is None:
            raise HPDError(f"--revision {revision}: {flag} {name} is a local folder, which has no revisions to choose; "
                           "drop --revision, or give the Hub id instead of the folder")
        if revision is not None and _ref_commit(path.parent.parent, revision) != origin[1]:
            raise HPDError(f"--revision {revision}: {flag} {name} is the snapshot of {origin[0]} at commit {origin[1][:12]}, not {revision}; "
                           f"give {flag} {origin[0]} --revision {revision}, or drop --revision")
        return path, origin[1] if origin else None
    if path.exists():
        raise HPDError(f"{flag} {name}: a file, not a model folder; give a Hugging Face model folder (config.json + weights) or a Hub id (org/name)")
    if not _is_repo_id(name):
        raise HPDError(f"{flag} {name}: no such folder, and not a Hugging Face Hub id (org/name); give a model folder (config.json + weights) or a Hub id")

    from huggingface_hub import errors, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # Raised by recent huggingface_hub releases for a snapshot an interrupted download left short.
    IncompleteSnapshotError = getattr(errors, "IncompleteSnapshotError", ())

    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    offline = hub_offline() if offline is None else offline
    storage = cache / ("models--" + name.replace("/", "--"))
    wanted = revision or "main"
    try:
        folder = snapshot_download(name, revision=revision, cache_dir=str(cache), local_files_only=offline, ignore_patterns=_IGNORE)
    except RevisionNotFoundError:
        raise HPDError(f"--revision {revision}: the Hub repo {name} has no such branch, tag or commit; give one it has (see its 'Files and versions' page)") from None
    except GatedRepoError:
        raise HPDError(f"{flag} {name}: a gated Hub repo; accept its terms on its Hub page and log in (`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise HPDError(f"{flag} {name}: no such folder, and no such model on the Hugging Face Hub (or it is private: log in with `hf auth login` or HF_TOKEN)") from None
    except IncompleteSnapshotError as exc:
        raise HPDError(f"{flag} {name}: the cached snapshot in {cache} is incomplete ({str(exc).split('. ')[1] if '. ' in str(exc) else exc}); "
                       "download it again with network access") from None
    except LocalEntryNotFoundError:
        if storage.is_dir() and _cached_refs(storage):
            raise HPDError(f"--revision {wanted}: {name} has no such revision in the Hugging Face cache {cache} "
                           f"(cached: {', '.join(_cached_refs(storage))})" + ("; with HF_HUB_OFFLINE=1 only cached revisions resolve" if offline else "")) from None
        if offline:
            raise HPDError(f"{flag} {name}: no such folder, and the Hub model {name} is not in the Hugging Face cache {cache} while HF_HUB_OFFLINE=1; "
                           f"download it once with network access (`hf download {name}`), set HF_HOME to the cache that holds it, or give a model folder") from None
        raise HPDError(f"{flag} {name}: no such folder, and the Hugging Face Hub cannot be reached to download {name} (and it is not cached in {cache}); "
                       "check the network, or give a model folder") from None
    except HFValidationError:
        raise HPDError(f"--revision {revision}: not a valid revision name") from None
    folder = Path(folder)
    origin = hub_origin(folder)
    log.info("%s %s: %s at commit %s", flag, name, folder, origin[1] if origin else "?")
    return folder, origin[1] if origin else None


def local_model(name: str, revision: str | None = None, flag: str = "--teacher") -> str:
    """:func:`resolve_model`'s folder, as the string engines take."""
    return str(resolve_model(name, revision, flag)[0])
