"""Training choices at an equal wall-clock budget (`--loss ce|kd|mix`, ...): each run's teacher-agreement curve
over labels seen and wall time, its throughput, and its held-out fidelity, in one JSON and one PNG.

Runs are `train-draft` output folders (`log.jsonl`, `train_config.json`); held-out fidelity is a `fidelity`
output folder per run (`summary.json`), e.g.

    for L in ce kd mix; do
      draftguide train-draft --data data/sgchat --out runs/loss/$L --block-size 8 --draft-layers 5 --loss $L \
        --anchors-per-seq 64 --batch-size 4 --max-len 512 --lr 6e-4 --autocast --time-budget-minutes 12 --seed 7
      draftguide fidelity --data HELDOUT_DIR --draft runs/loss/$L/draft --out runs/loss/fid-$L
    done
    python benchmarks/loss_curves.py --runs ce=runs/loss/ce,kd=runs/loss/kd,mix=runs/loss/mix \
        --fidelity ce=runs/loss/fid-ce,kd=runs/loss/fid-kd,mix=runs/loss/fid-mix --out benchmarks/results/issue13/loss
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from draftguide.reporting.plots import training_curves_figure
from draftguide.reporting.runs import write_json


def pairs(spec: str) -> dict[str, Path]:
    return {k: Path(v) for k, v in (p.split("=", 1) for p in spec.split(",") if p)}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarise(log: list[dict], config: dict, heldout: dict | None, tail: int = 10) -> dict:
    """The run's settings, its last `tail` log rows' mean k=1 agreement, its speed and its held-out numbers."""
    last = [r["agree"][0] for r in log[-tail:] if r.get("agree")]
    out = {
        "loss": config.get("loss"),
        "kd_weight": config.get("kd_weight"),
        "lr": config.get("lr"),
        "time_budget_s": config.get("time_budget_s"),
        "steps": log[-1]["step"],
        "labels_seen": log[-1]["labels_seen"],
        "elapsed_s": log[-1]["elapsed_s"],
        "labels_per_s": log[-1]["labels_seen"] / log[-1]["elapsed_s"],
        f"train_agreement_k1_last{tail}": sum(last) / len(last) if last else None,
    }
    if heldout:
        out["heldout"] = {
            "top1_agreement": heldout["top1_agreement"],
            "kl": heldout["kl"],
            "top1_agreement_k1_ci": heldout["top1_agreement_k1_ci"],
            "kl_k1_ci": heldout["kl_k1_ci"],
            "null_top1_agreement": {c: v["top1_agreement"] for c, v in heldout.get("controls", {}).items()},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", required=True, help="name=TRAIN_DIR,...")
    ap.add_argument("--fidelity", default="", help="name=FIDELITY_DIR,... (optional per run)")
    ap.add_argument("--out", required=True, help="folder for curves.json and curves.png")
    args = ap.parse_args()
    fid = pairs(args.fidelity)
    runs, summary = {}, {}
    for name, d in pairs(args.runs).items():
        log = read_jsonl(d / "log.jsonl")
        config = json.loads((d / "train_config.json").read_text())
        heldout = None
        if name in fid:
            readouts = json.loads((fid[name] / "summary.json").read_text())["readouts"]
            heldout = next(iter(readouts.values()))
        runs[name] = {"log": log, "heldout": heldout}
        summary[name] = summarise(log, config, heldout)
        print(name, json.dumps({k: v for k, v in summary[name].items() if k != "heldout"}), flush=True)
        if heldout:
            print(f"  held-out k=1..: {[round(a, 3) for a in heldout['top1_agreement']]}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "curves.json", {"runs": summary, "curves": {n: r["log"] for n, r in runs.items()}})
    training_curves_figure(runs, out / "curves.png")


if __name__ == "__main__":
    main()
