"""Shared helpers for benchmarks: machine description and section-wise updates of docs/benchmarks.md.

Each benchmark owns one section of ``docs/benchmarks.md`` delimited by
``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->`` and rewrites only that section, so
benchmarks can be rerun independently and the file keeps every result with its command.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEvery figure names the command that reproduces it and the machine it ran on.\n" \
    "Ratios compare against a baseline measured in the same run.\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores{mem}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def load_note() -> str:
    """How busy the machine was when the run started (1-minute load average against the cores)."""
    try:
        one = os.getloadavg()[0]
    except OSError:
        return "load average unknown"
    cores = os.cpu_count() or 1
    busy = "other jobs were running" if one > 0.5 * cores else "no other jobs to speak of"
    return f"load average {one:.1f} on {cores} cores at the start ({busy})"


def git_rev() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def bench_parser(doc: str, quick_help: str, *, threads: int = 0) -> "argparse.ArgumentParser":
    """The flags every benchmark takes: --quick (smoke run), --threads, --no-write."""
    ap = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--threads", type=int, default=threads, help="torch threads (0 = leave the default)")
    ap.add_argument("--no-write", action="store_true", help="print only, do not update docs/benchmarks.md")
    return ap


def parse_bench_args(ap: "argparse.ArgumentParser", argv: list[str] | None) -> "argparse.Namespace":
    """Parse, apply --threads, and seed torch so runs are comparable."""
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args


def command(module: str, argv: list[str] | None = None) -> str:
    """The command line that reproduces a benchmark run (``--no-write`` dropped)."""
    import sys

    flags = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--no-write"]
    return " ".join([f"python -m bench.{module}", *flags])


def write_section(name: str, title: str, command: str, body: str) -> Path:
    """Replace (or append) the section ``name`` of docs/benchmarks.md."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.exists() else HEADER
    stamp = time.strftime("%Y-%m-%d")
    section = (
        f"<!-- bench:{name} -->\n## {title}\n\n"
        f"- command: `{command}`\n- machine: {machine()}\n- date: {stamp}, commit {git_rev()}\n\n"
        f"{body.strip()}\n<!-- /bench:{name} -->"
    )
    pat = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = pat.sub(lambda _: section, text) if pat.search(text) else text.rstrip() + "\n\n" + section + "\n"
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, DOC)
    return DOC


def md_table(rows: list[dict], cols: list[str] | None = None) -> str:
    cols = cols or list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def timeit(fn, *, warmup: int = 2, repeat: int = 5, min_time: float = 0.2) -> float:
    """Median seconds per call of ``fn`` (after warm-up), repeating until ``min_time`` per sample."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        samples.append(dt / n)
    samples.sort()
    return samples[len(samples) // 2]
