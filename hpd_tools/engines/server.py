"""Server teacher: a running vLLM OpenAI-compatible server, reached by URL.

Each sequence is one ``POST {url}/v1/completions`` request::

    {"model": NAME, "prompt": [token ids], "max_tokens": 1, "temperature": 0,
     "prompt_logprobs": k, "return_token_ids": true}

vLLM answers ``choices[0].prompt_logprobs``: a list with one entry per prompt
position. Entry 0 is ``null`` (nothing predicts the first token); entry j >= 1
is a JSON object ``{"<token id>": {"logprob", "rank", "decoded_token"}}``
holding the actual token ``tokens[j]`` (with its true vocabulary rank) and the
top-k tokens (ranks 1..k). vLLM builds it as a dict, so when the actual token
is itself among the top-k it appears once (k entries, its rank then being its
top-k position); otherwise there are k + 1 entries. Row ``j - 1`` of the
result is entry j: ``label_logprob`` is the actual token's log-prob, the top-k
are the k entries other than the actual token's extra one, sorted by rank.
A log-prob of -inf comes back as -9999.0 (the server clamps it for JSON).
``return_token_ids`` makes the server echo the prompt ids, which are checked
against what was sent (a vLLM-specific field; older servers ignore it).

The server must accept a prompt of m tokens plus one generated token, so
``m <= max_model_len - 1``; longer sequences are rejected here before any
request is sent. ``k`` must be at most the server's ``--max-logprobs``
(default 20); the server answers 400 otherwise, which is raised as
``HPDError`` at once.

Model name and ``max_model_len`` come from ``GET {url}/v1/models`` (the first
model, or the one named by ``model``); ``version`` is the server's vLLM
version from ``GET {url}/version``. The vocabulary size (the width of the
teacher's distribution) is not in any server response, so it is, in order:
the ``vocab_size`` argument; ``vocab_size`` (or ``text_config.vocab_size``) of
``config.json`` in ``config_dir``; the same from the served model's ``root``
path when that is a folder readable here (the server runs on this machine or
shares its file system). Otherwise the constructor raises ``HPDError``
asking for ``vocab_size``.

Requests run concurrently on a small thread pool (``concurrency``) so that the
server can batch them. Connection errors, timeouts, HTTP 5xx, 408 and 429 are
retried ``retries`` times, waiting ``backoff * 2**attempt`` seconds in between;
then ``TeacherUnavailable`` is raised, naming the URL and the last error. One
request's failure stops the others' retries. Other HTTP 4xx responses raise
``HPDError`` immediately with the server's message. HTTP goes through one
pooled ``httpx`` client (keep-alive connections, ``concurrency`` of them); the
retry loop is ours because it retries on status codes and stops when another
request has failed, which transport-level retries do not.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Sequence

import httpx
import numpy as np

from ..errors import HPDError, TeacherUnavailable
from .base import Scored

_RETRY_STATUS = {408, 429}


class _Retryable(Exception):
    """A failure worth another try: connection, timeout, 5xx."""


class _Aborted(Exception):
    """Another request of the same batch already failed for good."""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _server_message(body: bytes) -> str:
    try:
        data = json.loads(body)
        err = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(err, dict):
            return _one_line(err.get("message") or err.get("detail") or json.dumps(err))
        return _one_line(str(err))
    except (ValueError, UnicodeDecodeError):
        return _one_line(body.decode("utf-8", "replace")) or "(empty body)"


def _vocab_from_config(folder: str | Path | None) -> int | None:
    if not folder:
        return None
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    for cfg in (config, config.get("text_config") or {}):
        if isinstance(cfg, dict) and cfg.get("vocab_size"):
            return int(cfg["vocab_size"])
    return None


class ServerTeacher:
    """Scores token sequences on a running vLLM OpenAI-compatible server.

    ``url``: the server's base URL, e.g. ``http://127.0.0.1:8000`` (a trailing
    ``/v1`` is accepted). ``timeout`` is per request in seconds.
    """

    name = "server"

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        vocab_size: int | None = None,
        config_dir: str | Path | None = None,
        max_length: int | None = None,
        concurrency: int = 8,
        retries: int = 3,
        backoff: float = 0.5,
        timeout: float = 300.0,
    ):
        base = url.strip().rstrip("/")
        if base.endswith("/v1"):
            base = base[:-3]
        if "://" not in base:
            raise HPDError(f"teacher server {url!r}: expected a URL such as http://127.0.0.1:8000")
        if concurrency < 1 or retries < 0 or backoff < 0 or timeout <= 0:
            raise HPDError("teacher server: concurrency >= 1, retries >= 0, backoff >= 0 and timeout > 0 are required")
        self.url = base
        self.concurrency = int(concurrency)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.timeout = float(timeout)
        # One pooled client (keep-alive connections, as many as the thread pool has
        # requests in flight) instead of a new TCP connection per request.
        self._client = httpx.Client(base_url=self.url, timeout=self.timeout,
                                    limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency))
        self._pool: ThreadPoolExecutor | None = None

        models = self._call("GET", "/v1/models", None, threading.Event()).get("data") or []
        if not models:
            raise HPDError(f"teacher server {self.url}: /v1/models lists no model")
        if model is None:
            card = next((m for m in models if not m.get("parent")), models[0])
        else:
            card = next((m for m in models if m.get("id") == model), None)
            if card is None:
                names = ", ".join(str(m.get("id")) for m in models)
                raise HPDError(f"teacher server {self.url}: no model {model!r}; it serves {names}")
        self.model = str(card["id"])
        self.max_model_len = int(card["max_model_len"]) if card.get("max_model_len") else None
        if max_length is not None and self.max_model_len is not None and max_length + 1 > self.max_model_len:
            raise HPDError(
                f"teacher server {self.url}: its max_model_len is {self.max_model_len}, sequences of {max_length} tokens "
                f"need at least {max_length + 1}; restart it with --max-model-len {max_length + 1} or lower --max-length"
            )
        try:
            self.version = str(self._call("GET", "/version", None, threading.Event(), retry=False).get("version") or "unknown")
        except HPDError:
            self.version = "unknown"
        found = vocab_size or _vocab_from_config(config_dir) or _vocab_from_config(card.get("root"))
        if not found:
            raise HPDError(
                f"teacher server {self.url}: cannot tell the vocabulary size of {self.model!r} (its folder "
                f"{card.get('root')!r} is not readable here); pass vocab_size"
            )
        self.vocab_size = int(found)

    # -- HTTP --------------------------------------------------------------

    def _once(self, method: str, path: str, payload: dict | None) -> Any:
        try:
            resp = self._client.request(method, path, json=payload)
        except httpx.TimeoutException as exc:
            raise _Retryable(f"{path}: timed out after {self.timeout:g} s") from exc
        except httpx.TransportError as exc:  # refused, reset, DNS, protocol errors
            raise _Retryable(f"{path}: {type(exc).__name__}: {_one_line(str(exc)) or 'connection failed'}") from None
        if resp.status_code >= 400:
            message = f"HTTP {resp.status_code} on {path}: {_server_message(resp.content)}"
            if resp.status_code >= 500 or resp.status_code in _RETRY_STATUS:
                raise _Retryable(message)
            raise HPDError(f"teacher server {self.url}: {message}")
        try:
            return resp.json()
        except ValueError:
            raise _Retryable(f"{path}: response is not JSON ({len(resp.content)} bytes)") from None

    def _call(self, method: str, path: str, payload: dict | None, abort: threading.Event, retry: bool = True) -> Any:
        attempts = self.retries + 1 if retry else 1
        last = ""
        for attempt in range(attempts):
            if abort.is_set():
                raise _Aborted()
            try:
                return self._once(method, path, payload)
            except _Retryable as exc:
                last = str(exc)
            if attempt + 1 < attempts and abort.wait(self.backoff * 2**attempt):
                raise _Aborted()
        raise TeacherUnavailable(f"teacher server {self.url} unavailable after {attempts} attempt(s): {last}")

    # -- scoring -----------------------------------------------------------

    def _score_one(self, tokens: list[int], k: int, abort: threading.Event) -> Scored:
        m = len(tokens)
        if m < 2:
            return Scored(np.zeros(0, np.float32), np.zeros((0, k), np.int64), np.zeros((0, k), np.float32))
        payload = {
            "model": self.model,
            "prompt": tokens,
            "max_tokens": 1,
            "temperature": 0,
            "prompt_logprobs": k,
            "return_token_ids": True,
        }
        response = self._call("POST", "/v1/completions", payload, abort)
        return self._parse(response, tokens, k)

    def _parse(self, response: Any, tokens: list[int], k: int) -> Scored:
        def bad(what: str) -> HPDError:
            return HPDError(f"teacher server {self.url}: unexpected /v1/completions answer ({what}); is it a vLLM server?")

        try:
            choice = response["choices"][0]
            plp = choice["prompt_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise bad("no choices[0].prompt_logprobs") from None
        echoed = choice.get("prompt_token_ids")
        if echoed is not None and list(echoed) != tokens:
            raise bad("its prompt_token_ids differ from the tokens sent")
        m = len(tokens)
        if not isinstance(plp, list) or len(plp) != m:
            raise bad(f"{len(plp) if isinstance(plp, list) else type(plp).__name__} prompt positions for {m} tokens")
        label = np.empty(m - 1, np.float32)
        ids = np.empty((m - 1, k), np.int64)
        lps = np.empty((m - 1, k), np.float32)
        for j in range(1, m):
            entry = plp[j]
            actual = str(tokens[j])
            if not isinstance(entry, dict) or actual not in entry:
                raise bad(f"position {j} lacks the actual token {actual}")
            label[j - 1] = entry[actual]["logprob"]
            if len(entry) == k + 1:  # actual token outside the top-k: drop its extra entry
                items = [(key, v) for key, v in entry.items() if key != actual]
            elif len(entry) == k:  # actual token is one of the top-k (listed once)
                items = list(entry.items())
            else:
                raise bad(f"position {j} has {len(entry)} entries for k={k}")
            items.sort(key=lambda kv: (kv[1]["rank"], -kv[1]["logprob"]))
            ids[j - 1] = [int(key) for key, _ in items]
            lps[j - 1] = [v["logprob"] for _, v in items]
        return Scored(label, ids, lps)

    def score(self, sequences: Sequence[np.ndarray], k: int, *, samples: int = 0, seeds: Sequence[int] | None = None) -> list[Scored]:
        if samples:  # the completions API returns top-k prompt log-probs only, never the full distribution to draw from
            raise HPDError(f"teacher server {self.url}: cannot draw samples (--signal sampled) over the completions API; use --engine hf or vllm")
        if k < 1:
            raise HPDError(f"top-k {k}: must be at least 1")
        token_lists = [np.asarray(s).astype(np.int64).tolist() for s in sequences]
        if self.max_model_len is not None:
            for tokens in token_lists:
                if len(tokens) > self.max_model_len - 1:
                    raise HPDError(
                        f"teacher server {self.url}: a sequence of {len(tokens)} tokens exceeds its max_model_len "
                        f"{self.max_model_len} minus one; restart it with a larger --max-model-len"
                    )
        if not token_lists:
            return []
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="hpd-server")
        abort = threading.Event()
        futures: list[Future] = [self._pool.submit(self._score_one, t, k, abort) for t in token_lists]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None and not isinstance(f.exception(), _Aborted)]
        if failed:
            abort.set()
            for f in pending:
                f.cancel()
            wait(pending)
            raise failed[0].exception()  # type: ignore[misc]
        return [f.result() for f in futures]

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()
