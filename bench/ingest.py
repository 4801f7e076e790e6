"""Time mailtally's ingest stages against pflogsumm on one generated log.

Stages, each in a child process of its own so that its peak RSS is its own:

  (a) parse          mailtally.ingest.bench_parse(path)
  (b) correlate      mailtally.ingest.bench_correlate(path): parse + correlate, no store
  (c) ingest         mailtally ingest --config CFG --db DB FILE (fresh database)
  (d) pflogsumm      pflogsumm FILE > /dev/null

The log (seed fixed) is written to bench/out/ by bench/genlog.py and reused while its
parameters are unchanged. Targets: (c) at least 2x and (b) at least 4x pflogsumm's
lines/s; with --memory, ingest's peak RSS at 10M lines at most 1.5x that at 1M and
under 150 MiB. The script prints a table and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE))

import genlog  # noqa: E402  (a script beside this one, not a package)

TARGET_INGEST, TARGET_CORRELATE = 2.0, 4.0  # times pflogsumm's lines/s
TARGET_GROWTH, TARGET_RSS_MIB = 1.5, 150.0
STAGE_CODE = (
    "import sys; from pathlib import Path; from mailtally.ingest import {fn}; "
    "print({fn}(Path(sys.argv[1])))"
)


@dataclass(frozen=True)
class Run:
    """One child process: what it read, how long it took, how much memory it held."""

    name: str
    lines: int
    wall: float  # seconds
    cpu: float  # user + system seconds
    peak_mib: float
    returncode: int
    stderr: str

    @property
    def rate(self) -> float:
        return self.lines / self.wall if self.wall > 0 else 0.0


def child_env(tree: Path = ROOT) -> dict[str, str]:
    """The environment for children: mailtally importable from `tree` (this checkout)."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree / "daemon"), *paths])}


def measure(
    name: str, cmd: list[str], stdout_to: Path | None = None, tree: Path = ROOT
) -> tuple[Run, str]:
    """Run `cmd` and return its Run (peak RSS from wait4, this child only) and stdout."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sink = stdout_to.open("wb") if stdout_to is not None else out
        try:
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=sink, stderr=err, env=child_env(tree))
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
        finally:
            if stdout_to is not None:
                sink.close()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace").strip()
    run = Run(
        name,
        0,
        wall,
        usage.ru_utime + usage.ru_stime,
        usage.ru_maxrss / 1024,
        proc.returncode,
        stderr,
    )
    return run, text


def ensure_log(lines: int, seed: int, fmt: str) -> tuple[Path, dict[str, Any]]:
    """Return (log, truth) for these parameters, generating them unless already there."""
    OUT.mkdir(parents=True, exist_ok=True)
    log = OUT / f"genlog-{fmt}-{lines}-s{seed}.log"
    truth_path = log.with_suffix(".json")
    params = genlog.Params(
        lines, seed, fmt, genlog.DEFAULT_START, 3, genlog.default_days(lines), "UTC"
    )
    wanted = {**vars(params), "version": genlog.GENERATOR_VERSION}
    if log.exists() and truth_path.exists():
        truth = json.loads(truth_path.read_text(encoding="utf-8"))
        if truth.get("generator") == wanted and truth.get("lines") == lines:
            print(f"reusing {log.relative_to(ROOT)} ({log.stat().st_size / 2**20:.0f} MiB)")
            return log, truth
    cmd = [
        sys.executable,
        str(HERE / "genlog.py"),
        "--lines",
        str(lines),
        "--seed",
        str(seed),
        "--format",
        fmt,
        "--out",
        str(log),
        "--truth",
        str(truth_path),
    ]
    run, _ = measure("genlog", cmd)
    if run.returncode != 0:
        sys.exit(f"bench: genlog failed: {run.stderr}")
    print(
        f"generated {log.relative_to(ROOT)}: {lines} lines in {run.wall:.1f} s"
        f" ({lines / run.wall:,.0f} lines/s, peak {run.peak_mib:.0f} MiB)"
    )
    return log, json.loads(truth_path.read_text(encoding="utf-8"))


def stage(name: str, fn: str, log: Path, tree: Path = ROOT) -> Run:
    code = STAGE_CODE.format(fn=fn)
    run, out = measure(name, [sys.executable, "-c", code, str(log)], tree=tree)
    lines = int(out.strip()) if run.returncode == 0 and out.strip().isdigit() else 0
    return replace(run, name=name, lines=lines)


def ingest(log: Path, lines: int, tree: Path = ROOT, name: str = "(c) ingest") -> Run:
    db = OUT / "x.db"
    for p in (db, db.with_name("x.db-wal"), db.with_name("x.db-shm")):
        p.unlink(missing_ok=True)
    cfg = OUT / "bench.yaml"
    cfg.write_text(f"timezone: UTC\ndatabase: {db}\n", encoding="utf-8")
    cmd = [
        sys.executable,
        "-m",
        "mailtally",
        "ingest",
        "--config",
        str(cfg),
        "--db",
        str(db),
        str(log),
    ]
    run, _ = measure(name, cmd, tree=tree)
    return replace(run, lines=lines if run.returncode == 0 else 0)


def find_pflogsumm() -> str | None:
    """Return pflogsumm's path; Debian installs it in /usr/sbin, often not on PATH."""
    return shutil.which(
        "pflogsumm", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"])
    )


def pflogsumm(exe: str, log: Path, lines: int) -> Run:
    run, _ = measure("(d) pflogsumm", [exe, str(log)], stdout_to=Path(os.devnull))
    return replace(run, lines=lines if run.returncode == 0 else 0)


def best_rounds(n: int, stages: list[Callable[[], Run]]) -> list[Run]:
    """Run every stage once per round, `n` rounds; keep each stage's fastest run.

    Rounds interleave the stages, so a slow spell of the machine hits all of them
    alike and the ratios stay fair (peak RSS: the largest seen).
    """
    rounds = [[stage() for stage in stages] for _ in range(n)]
    out = []
    for runs in zip(*rounds, strict=True):
        fastest = min(runs, key=lambda r: (r.returncode != 0, r.wall))
        out.append(replace(fastest, peak_mib=max(r.peak_mib for r in runs)))
    return out


def print_table(runs: list[Run], base: Run | None) -> None:
    print(
        f"\n{'stage':<20}{'lines/s':>12}{'wall s':>9}{'cpu s':>9}{'peak MiB':>10}"
        f"{'x pflogsumm':>13}"
    )
    for r in runs:
        ratio = f"{r.rate / base.rate:.2f}" if base and base.rate and r is not base else ""
        note = "" if r.returncode == 0 else f"   FAILED rc={r.returncode}: {r.stderr[-200:]}"
        print(
            f"{r.name:<20}{r.rate:>12,.0f}{r.wall:>9.2f}{r.cpu:>9.2f}{r.peak_mib:>10.1f}"
            f"{ratio:>13}{note}"
        )
    print(
        f"targets: (b) >= {TARGET_CORRELATE:g}x and (c) >= {TARGET_INGEST:g}x pflogsumm's lines/s"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--lines", type=int, default=1_000_000, help="lines in the log")
    ap.add_argument("--seed", type=int, default=1, help="generator seed")
    ap.add_argument(
        "--format",
        choices=genlog.FORMATS,
        default="traditional",
        help="log format (pflogsumm reads all three)",
    )
    ap.add_argument("--skip-pflogsumm", action="store_true", help="leave out stage (d)")
    ap.add_argument(
        "--repeat", type=int, default=3, help="rounds of all stages; each stage's best is kept"
    )
    ap.add_argument(
        "--memory", action="store_true", help="also ingest a 10x larger log and compare peak RSS"
    )
    ap.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="another checkout (built in place, e.g. a git worktree of an older commit):"
        " also time (b) and (c) with its code, interleaved, and print the difference",
    )
    args = ap.parse_args(argv)

    log, truth = ensure_log(args.lines, args.seed, args.format)
    lines = truth["lines"]
    print(
        f"log: {lines} lines, {log.stat().st_size / 2**20:.0f} MiB, {args.format},"
        f" {truth['first_line']} .. {truth['last_line']}"
    )
    n = max(1, args.repeat)
    stages: list[Callable[[], Run]] = [
        lambda: stage("(a) parse", "bench_parse", log),
        lambda: stage("(b) correlate", "bench_correlate", log),
        lambda: ingest(log, lines),
    ]
    exe = None if args.skip_pflogsumm else find_pflogsumm()
    if exe is not None:
        stages.append(lambda: pflogsumm(exe, log, lines))
    elif not args.skip_pflogsumm:
        print("pflogsumm not found; leaving out (d)")
    if args.baseline is not None:
        tree = args.baseline.resolve()
        stages.append(lambda: stage("(b) baseline", "bench_correlate", log, tree))
        stages.append(lambda: ingest(log, lines, tree, "(c) baseline"))
    runs = best_rounds(n, stages)
    full = runs[2]
    base = runs[3] if exe is not None else None
    print_table(runs, base)
    if args.baseline is not None:
        for this, then in ((runs[1], runs[-2]), (full, runs[-1])):
            cost = (this.wall / then.wall - 1) * 100 if then.wall else 0.0
            print(f"{this.name} against {then.name}: {cost:+.1f}% wall time")

    if args.memory:
        big_log, big_truth = ensure_log(args.lines * 10, args.seed, args.format)
        big = ingest(big_log, big_truth["lines"])
        growth = big.peak_mib / full.peak_mib if full.peak_mib else 0.0
        print(f"\n{'ingest peak RSS':<20}{'lines':>12}{'peak MiB':>10}{'lines/s':>12}")
        for r, n in ((full, lines), (big, big_truth["lines"])):
            print(
                f"{'':<20}{n:>12,}{r.peak_mib:>10.1f}{r.rate:>12,.0f}"
                + ("" if r.returncode == 0 else f"   FAILED rc={r.returncode}")
            )
        print(
            f"growth {growth:.2f}x (target <= {TARGET_GROWTH:g}x),"
            f" peak {big.peak_mib:.0f} MiB (target < {TARGET_RSS_MIB:g} MiB)"
        )
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"(this script's own peak RSS: {own:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
