"""The compute profile of the default pair, as `draftguide profile` measures it, kept as a benchmark JSON:
prefill vs context length, draft and speculative step costs, a TTT step, guided decoding per token, and
decode bandwidth against the machine's read/copy bandwidth. One torch thread by default (the 2-core CPU is
shared; run it when the machine is quiet: the load average before and after is recorded).

    python benchmarks/bench_profile.py [--draft DIR] [--context-lens 256,...,4096] [--threads 1] \\
        [--out runs/bench-profile] [--json benchmarks/results/profile.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from draftguide.app.cli import main as cli
from draftguide.reporting.runs import write_json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--draft", default=None, help="draft folder (default: the shipped draft)")
    ap.add_argument("--context-lens", default="256,512,1024,2048,4096")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ttt-steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/bench-profile")
    ap.add_argument("--json", default="benchmarks/results/profile.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    argv = [
        "profile",
        "--target",
        args.target,
        "--out",
        args.out,
        "--context-lens",
        args.context_lens,
        "--repeats",
        str(args.repeats),
        "--ttt-steps",
        str(args.ttt_steps),
    ] + (["--draft", args.draft] if args.draft else [])
    load0, t0 = os.getloadavg(), time.perf_counter()
    code = cli(argv)
    if code != 0:
        raise SystemExit(code)
    s = json.loads((Path(args.out) / "summary.json").read_text())
    write_json(
        args.json,
        {
            "command": f"python benchmarks/bench_profile.py --context-lens {args.context_lens} --repeats "
            f"{args.repeats} "
            f"--ttt-steps {args.ttt_steps} --threads {args.threads}" + (f" --draft {args.draft}" if args.draft else ""),
            "wall_s": time.perf_counter() - t0,
            "loadavg_before": load0,
            "loadavg_after": os.getloadavg(),
            **{k: v for k, v in s.items() if k != "command"},
        },
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
