"""What the node benchmarks share: the phantom studies they send, the CPU accounting that says
whether the machine was idle, and the small pieces of their ``main``.

The phantom studies (four series, one axial stack) are rendered once into ``bench/out/latency``
and reused by every run and every benchmark that asks for no more of them than are there.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import FrameType
from typing import Any

from models.data.phantom import generate

PHANTOM_DIR = Path(__file__).resolve().parent / "out" / "latency"
PHANTOM_SEED = 5050


def render(count: int) -> list[Path]:
    """``count`` phantom study folders, rendered once (truth.json is written last) and reused."""
    studies = sorted(p.parent for p in PHANTOM_DIR.glob("study_*/truth.json"))[:count]
    return studies if len(studies) == count else generate(PHANTOM_DIR, count, PHANTOM_SEED, progress=False, axial="single")


def busy_cpu_s(cpus: list[int]) -> float:
    """CPU-seconds these CPUs have been busy since boot (/proc/stat: all but idle and iowait; steal counts)."""
    busy = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields[:8])
            busy += user + nice + system + irq + softirq + steal
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU-seconds of this process and its ended children (the node once stopped, storescu, echoscu)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def rounded(values: dict[str, Any]) -> dict[str, Any]:
    """The floats of ``values`` to 4 decimals, for the JSON a benchmark writes."""
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()}


def interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM handler: raise KeyboardInterrupt so the benchmark's ExitStack stops what it started."""
    raise KeyboardInterrupt
