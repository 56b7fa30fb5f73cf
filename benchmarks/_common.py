"""Helpers shared by the benchmarks: measured subprocesses, machine facts, Markdown tables.

Kept free of torch imports so a benchmark's parent process stays small and its children's peak
RSS is their own.
"""
from __future__ import annotations

import datetime
import json
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_measured(cmd: list[str], *, timeout: float | None = None, env: dict | None = None,
                 cwd: str | Path | None = None) -> dict:
    """Run ``cmd`` as a fresh process; returns rc, wall seconds, its own peak RSS and its output.

    Peak RSS is ``ru_maxrss`` of that one child, read with ``os.wait4`` (what ``/usr/bin/time -v``
    reports); RUSAGE_CHILDREN would be a running maximum over every child so far.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
        fired = threading.Event()
        killer = threading.Timer(timeout, lambda: (fired.set(), proc.kill())) if timeout else None
        if killer:
            killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            if killer:
                killer.cancel()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {
            "rc": proc.returncode,
            "timed_out": fired.is_set(),
            "wall_s": wall,
            "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux reports KiB
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace"),
        }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    try:  # read-only
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _git_dirty() -> list[str]:
    """Tracked files with uncommitted changes (read-only: no index refresh is written)."""
    try:
        out = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
                             cwd=REPO, capture_output=True, text=True, timeout=10).stdout
        return [line[3:] for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return []


def machine_info() -> dict:
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_total_gib": _mem_total_gib(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": _version("torch"),
        "timm": _version("timm"),
        "weightgen": _version("weightgen"),
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
    }


def markdown_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """``align``: one of l/r per column (default: left for the first column, right for the rest)."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(out_dir, stem: str, markdown: str, data, *, indent: int = 2, default=None,
                  newline: bool = False) -> None:
    """Write ``stem.md`` and ``stem.json`` under ``out_dir`` (created) and print the Markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(markdown)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=indent, default=default) + ("\n" if newline else ""))
    print(markdown)
