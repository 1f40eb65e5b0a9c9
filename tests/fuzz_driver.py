"""Run many `hpd-tools` command lines in one process, for tests/test_fuzz.py.

Starting the CLI costs seconds (torch and transformers imports), so the fuzz
table runs inside one interpreter: each case is one call of the real click
command (`hpd_tools.cli.main`) through click's CliRunner, which captures the
exit code, stdout, stderr and any uncaught exception. After each case the
protected trees (every input and pre-existing folder) are hashed again, so a
case that changed something outside its own output is named.

    python tests/fuzz_driver.py SPEC.json RESULTS.jsonl

SPEC holds {"protected": [paths], "cases": [{"id", "argv", "env", "guard"}]}.
Each case appends one JSON line to RESULTS as soon as it ends ({"start": id}
before it begins), so a case that kills the process is still named.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import sys
import time
import traceback
from pathlib import Path


def digest(root: str | Path, memo: dict | None = None) -> dict[str, str]:
    """Every entry under ``root`` (and ``root`` itself): files by content hash and
    mode, folders by mode, symbolic links by target. Links are never followed.

    With ``memo``, a file whose (inode, size, mtime, ctime) is unchanged is not
    read again: any write or chmod moves its ctime, which no program can set back."""
    root = str(root)
    out: dict[str, str] = {}

    def entry(path: str) -> str:
        st = os.lstat(path)
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            return f"link {os.readlink(path)}"
        if stat.S_ISDIR(st.st_mode):
            return f"dir {mode:o}"
        if stat.S_ISREG(st.st_mode):
            key = (path, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if memo is not None and key in memo:
                return f"file {mode:o} {memo[key]}"
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            if memo is not None:
                memo[key] = h.hexdigest()
            return f"file {mode:o} {h.hexdigest()}"
        return f"other {st.st_mode:o}"

    if not os.path.lexists(root):
        return {root: "absent"}
    out[root] = entry(root)
    if os.path.isdir(root) and not os.path.islink(root):
        for folder, dirs, files in os.walk(root, followlinks=False):
            for name in sorted(dirs + files):
                path = os.path.join(folder, name)
                out[path] = entry(path)
    return out


def digest_all(roots: list[str], memo: dict | None = None) -> dict[str, str]:
    out: dict[str, str] = {}
    for r in roots:
        out.update(digest(r, memo))
    return out


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Paths added, removed or changed, each with what happened."""
    diff = []
    for path in sorted(set(before) | set(after)):
        a, b = before.get(path), after.get(path)
        if a != b:
            diff.append(f"{path}: {'added' if a is None else 'removed' if b is None else 'changed'}")
    return diff


def main(spec_path: str, results_path: str) -> None:
    from click.testing import CliRunner

    from hpd_tools.cli import main as cli

    spec = json.loads(Path(spec_path).read_text())
    protected = spec["protected"]
    memo: dict = {}
    baseline = digest_all(protected, memo)
    runner = CliRunner()
    with open(results_path, "a") as results:
        def emit(row: dict) -> None:
            results.write(json.dumps(row) + "\n")
            results.flush()

        for case in spec["cases"]:
            emit({"start": case["id"]})
            guard_before = digest_all(case.get("guard", []))
            # The CLI configures logging on its first call; bind it to this case's stderr.
            for handler in logging.root.handlers[:]:
                logging.root.removeHandler(handler)
            t0 = time.perf_counter()
            result = runner.invoke(cli, case["argv"], env=case.get("env") or {}, catch_exceptions=True)
            seconds = time.perf_counter() - t0
            exception = None
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                exception = "".join(traceback.format_exception(*result.exc_info))
            now = digest_all(protected, memo)
            emit({
                "id": case["id"],
                "exit_code": result.exit_code,
                "stdout": result.stdout[-4000:],
                "stderr": result.stderr[-8000:],
                "exception": exception,
                "changed": changed(baseline, now) + changed(guard_before, digest_all(case.get("guard", []))),
                "vllm_imported": "vllm" in sys.modules,
                "seconds": round(seconds, 3),
            })
            baseline = now  # a change is reported once, by the case that made it


if __name__ == "__main__":
    main(*sys.argv[1:])
