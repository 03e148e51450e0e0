"""Shared by the benchmarks: machine description, robust statistics, and BENCHMARKS.md sections.

Each benchmark owns one section of BENCHMARKS.md between ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->``; re-running a benchmark replaces its own section only, atomically.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("ORPOLAB_ROOT", str(ROOT))
DEFAULT_OUT = ROOT / "BENCHMARKS.md"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    from orpolab.core.machine import available_cores

    return available_cores()


def machine() -> str:
    """One line: CPU, cores, memory, Python and the versions that matter for speed."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
    versions = []
    for pkg in ("torch", "transformers", "peft", "lightning", "trl", "llama_cpp_python", "flow-judge"):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    return (f"{cpu_name()}, {cores()} cores, {mem:.0f} GiB; Python {platform.python_version()}; "
            + ", ".join(versions))


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summary(values: list[float]) -> dict:
    """Median and spread (min, max) of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(s: dict, digits: int = 1) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def write_section(name: str, body: str, out: Path = DEFAULT_OUT, raw: dict | None = None) -> None:
    """Replace (or append) this benchmark's section of BENCHMARKS.md; raw figures go to bench/results/."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = f"{start}\n{body.rstrip()}\n\n_Measured {stamp} on: {machine()}._\n{end}"
    text = out.read_text(encoding="utf-8") if out.is_file() else "# Benchmarks\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    if raw is not None:
        results = out.parent / "bench" / "results" if out.parent == ROOT else out.parent / "results"
        results.mkdir(parents=True, exist_ok=True)
        (results / f"{name}.json").write_text(json.dumps(raw, indent=2, default=str), encoding="utf-8")
