"""Where a recorded result came from: the ``meta`` block every results file carries.

A number without its command, commit, versions and machine cannot be checked or reproduced,
so every script that writes results (``kvpolicy compare/sweep --json``, the needle probe, the
throughput and kvpress benchmarks) puts this block beside its rows.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import shlex
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

_PACKAGES = ("torch", "transformers", "kvpolicy", "kvpress", "pydantic")
_REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(_REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """The checkout's commit and whether tracked files differ from it (None outside a git checkout)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def source_digest() -> str:
    """SHA-256 (first 16 hex digits) of the package, benchmark and preset files as they are on disk.

    The commit alone does not name the code of a dirty checkout, nor of a copy whose git metadata
    is older than its files (the lent GPU machine gets this repository's files beside the landed
    commit's history): two runs with the same digest ran the same code."""
    digest = hashlib.sha256()
    for folder, pattern in (("kvpolicy", "**/*.py"), ("benchmarks", "*.py"), ("configs", "*")):
        for path in sorted((_REPO / folder).glob(pattern)):
            if path.is_file():
                digest.update(path.relative_to(_REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def versions(packages: tuple[str, ...] = _PACKAGES) -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpus": os.cpu_count(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name(0)
            info["gpus"] = torch.cuda.device_count()
            info["cuda"] = torch.version.cuda
        else:
            info["device"] = "cpu"
    return info


def pasteable_command(argv: list[str]) -> str:
    """The command line as a shell would take it again: a script (``*.py``) is run with ``python``,
    a console script (``kvpolicy``) as it is; every argument quoted where it needs to be."""
    if not argv:
        return "python"
    return shlex.join((["python"] if argv[0].endswith(".py") else []) + list(argv))


def markdown_provenance(meta: dict[str, Any], model: str) -> list[str]:
    """The command and machine lines a results page opens with, read from its ``run_meta`` block."""
    where, v = meta["machine"], meta["versions"]
    device = where.get("device", "cpu")
    commit = (meta.get("commit") or "unknown")[:7]
    return [
        f"Command: `{meta['command']}`  ",
        f"Machine: {'CPU' if device == 'cpu' else device} ({where['cpus']} CPUs), torch {v['torch']}, transformers "
        f"{v['transformers']}, model {model}, commit {commit}{' (dirty)' if meta.get('dirty') else ''}, "
        f"{meta['date']}.",
    ]


def run_meta(argv: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """The ``meta`` block: command line, git commit (with a dirty flag), versions, machine, threads, date.

    ``argv`` defaults to this process's; ``extra`` adds the script's own settings (shape, dtype, ...).
    """
    args = sys.argv if argv is None else argv
    meta: dict[str, Any] = {
        "command": pasteable_command(args),
        "argv": list(args),
        **git_state(),
        "source_digest": source_digest(),
        "versions": versions(),
        "machine": machine(),
        "env_threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update(extra)
    return meta
