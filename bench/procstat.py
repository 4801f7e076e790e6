"""CPU time of a process tree from /proc, for the benchmarks (Linux only)."""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> dict[int, float]:
    """Return user + system CPU seconds of `pid` and each of its descendants, by pid."""
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="ascii", errors="replace")
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces
        parents[int(entry.name)] = int(fields[1])
        used[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    tree = {pid}
    for _ in range(8):  # depth bound; the daemon has one level of children
        tree |= {p for p, parent in parents.items() if parent in tree}
    return {p: used[p] for p in tree if p in used}
