"""How often a receiver makes the disk sync per instance: strace counts its sync calls.

One instance over one association can go no faster than the syncs it waits for in turn, so this
count explains most of the x1 column. It is taken on a separate, untimed run because strace slows
every process it traces.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

STRACE = "strace"
SYNC_CALLS = ("fsync", "fdatasync", "sync_file_range", "syncfs", "sync")


def count_syncs(pids: list[int], work: Callable[[], None], summary: Path, timeout: float = 30.0) -> dict[str, int]:
    """Calls of each of SYNC_CALLS made by ``pids`` (their threads and new children too) while
    ``work`` runs: strace attaches to every pid before ``work`` starts."""
    argv = [STRACE, "-f", "-c", "-o", str(summary), "-e", "trace=" + ",".join(SYNC_CALLS)]
    for pid in pids:
        argv += ["-p", str(pid)]
    tracer = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        _wait_attached(tracer, set(pids), timeout)
        work()
    finally:
        tracer.send_signal(signal.SIGINT)  # strace detaches and writes its summary
        tracer.communicate(timeout=timeout)
    return parse_summary(summary.read_text())


def _wait_attached(tracer: subprocess.Popen[str], pids: set[int], timeout: float) -> None:
    """Read strace's stderr until it says it has attached to every pid."""
    assert tracer.stderr is not None
    waiting, deadline = set(pids), time.monotonic() + timeout
    while waiting:
        line = tracer.stderr.readline()
        if not line or time.monotonic() > deadline:
            raise RuntimeError(f"strace did not attach to {sorted(waiting)}: {line.strip() or 'it exited'}")
        words = line.split()
        if "attached" in words and "Process" in words:
            waiting.discard(int(words[words.index("Process") + 1]))


def parse_summary(text: str) -> dict[str, int]:
    """Calls per sync system call from ``strace -c`` output (columns: % time, seconds, usecs/call,
    calls, [errors,] syscall); every one of SYNC_CALLS is present, 0 if never called."""
    counts = dict.fromkeys(SYNC_CALLS, 0)
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 5 and words[-1] in counts and words[3].isdigit():
            counts[words[-1]] = int(words[3])
    return counts
