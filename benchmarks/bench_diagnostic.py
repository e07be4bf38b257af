"""Wall time and peak memory of the readout diagnostic: `draftguide diagnose` on the built-in suite with the
default pair, both modes and both controls, run in this process exactly as the command runs (model loading,
the greedy eval that tags solved tasks unless --solved-from is given, scoring, summary, figures). The issue's
budget: under 5 minutes and under 4 GB peak RSS on the 2-core CPU. Writes JSON.

    python benchmarks/bench_diagnostic.py [--draft DIR|init] [--limit N] [--solved-from RESULTS.jsonl] \\
        [--out runs/bench-diagnostic] [--json benchmarks/results/diagnostic.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from draftguide.app.cli import main as cli
from draftguide.reporting.runs import environment, write_json


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--draft", default=None, help="draft folder, 'init', or the shipped draft (default)")
    ap.add_argument("--tasks", default="builtin")
    ap.add_argument("--modes", default="next,block")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--solved-from", default=None, help="reuse an eval's results instead of timing the greedy eval too")
    ap.add_argument("--out", default="runs/bench-diagnostic")
    ap.add_argument("--json", default="benchmarks/results/diagnostic.json")
    args = ap.parse_args()

    argv = ["diagnose", "--target", args.target, "--tasks", args.tasks, "--modes", args.modes, "--out", args.out]
    for flag, val in (("--draft", args.draft), ("--limit", args.limit), ("--solved-from", args.solved_from)):
        if val is not None:
            argv += [flag, str(val)]
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    code = cli(argv)
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(code)
    s = json.loads((Path(args.out) / "summary.json").read_text())
    result = {
        "command": s["command"],  # the argv the run recorded
        "wall_s": wall,
        "scoring_s": s["score_s"],  # teacher-forced forwards only (target + draft + controls)
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_mb_before_run": rss0,
        "budget": {"wall_s": 300, "peak_rss_mb": 4096},
        "within_budget": wall < 300 and peak_rss_mb() < 4096,
        "n_tasks": s["n_tasks"],
        "n_tokens": s["n_tokens"],
        "n_skipped": s["n_skipped"],
        "verdict": s["verdict"],
        "verdict_detail": s["verdict_detail"],
        "solve_status": "from " + args.solved_from if args.solved_from else "greedy eval in this run",
        "environment": environment(),
    }
    write_json(Path(args.json), result)
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("wall_s", "scoring_s", "peak_rss_mb", "within_budget", "n_tasks", "n_tokens", "verdict")
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
