"""Layer ablation (research plan 3.2): which target layers carry a deep readout's fidelity, and its advantage
on failed tasks?

One aligned readout (`context_includes_anchor`: block k = 1 sees the features of the positions whose last
state the target's `lm_head` reads) is trained per set of `target_layer_ids`, every set with the SAME
training config: same data, same seed (same sample order and anchors), same budget (the same `--steps`, or the
same wall-time budget whose schedule `train_draft` fits into it), only the layer set differs. Then each is
measured:

- readout fidelity (`fidelity.run_fidelity`: top-1 agreement and KL with the target per offset, against a
  shuffled-feature null), one run per set on the same sequences;
- the readout diagnostic (`report.run_diagnose`), one run with every set as a readout side by side (one
  target forward per task, each readout with its own null controls and verdict).

Outputs: `sets/<name>/` (training run: log.jsonl, train_config.json, draft/; fidelity/), `diagnose/`,
`summary.json`, `ablation.md` (table: budget, steps, final loss, fidelity at k = 1 with its null, diagnostic
verdict and mean per-task log-p difference, all and failed tasks) and `ablation.png` (loss curves, fidelity,
diagnostic). Resumable: a set whose training finished is not retrained.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from draftguide.errors import DraftGuideError

DEFAULT_SETS = "1,8,14,20,27;1,4,7,10,13;17,20,23,26,27;27;14"


def parse_layer_sets(text: str, num_layers: int | None = None) -> list[list[int]]:
    """ "1,8,14;27" -> [[1, 8, 14], [27]]; each id a target decoder layer (0-based, < num_layers)."""
    sets = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        try:
            ids = [int(x) for x in part.split(",") if x.strip()]
        except ValueError:
            raise DraftGuideError(f"--layer-sets {text!r}: expected ';'-separated comma lists of layer ids") from None
        if not ids or len(set(ids)) != len(ids):
            raise DraftGuideError(f"--layer-sets: set {part!r} is empty or repeats a layer")
        if num_layers is not None and not all(0 <= i < num_layers for i in ids):
            raise DraftGuideError(f"--layer-sets: set {part!r} names a layer outside 0..{num_layers - 1}")
        sets.append(ids)
    if not sets:
        raise DraftGuideError(f"--layer-sets {text!r}: no layer set")
    if len({tuple(s) for s in sets}) != len(sets):
        raise DraftGuideError("--layer-sets: a set is given twice")
    return sets


def set_name(ids: list[int]) -> str:
    return "L" + "-".join(map(str, ids))


def _log(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def train_sets(
    target, tokenizer, data_dir, out_dir: Path, sets: list[list[int]], cfg, *, progress: bool = True
) -> dict:
    """Train one aligned readout per layer set with `cfg` (a `train.TrainConfig`; only `target_layer_ids`
    changes, `context_includes_anchor` is forced on). Returns {name: training record}."""
    from draftguide.training.train import train_draft

    out = {}
    for ids in sets:
        name = set_name(ids)
        folder = out_dir / "sets" / name
        c = dataclasses.replace(cfg, target_layer_ids=list(ids), context_includes_anchor=True)
        done = _log(folder / "log.jsonl")
        ckpt = folder / "checkpoint.pt"
        res = train_draft(target, tokenizer, data_dir, folder, c, resume=ckpt.is_file(), progress=progress)
        res.pop("model", None)
        log = _log(folder / "log.jsonl")
        out[name] = {
            "layers": list(ids),
            "steps": res["step"],
            "total_steps": res["total_steps"],
            "finished": res["finished"],
            "elapsed_s": res["elapsed_s"],
            "final_loss": log[-1]["loss"] if log else None,
            "final_acc_k1": log[-1]["acc"][0] if log else None,
            "labels_seen": log[-1].get("labels_seen") if log else None,
            "resumed": bool(done),
            "draft": res["draft"],
        }
    return out


def load_readouts(out_dir: Path, names: list[str], target) -> dict:
    from draftguide.modeling.draft_io import load_draft

    return {n: load_draft(out_dir / "sets" / n / "draft", target).eval().requires_grad_(False) for n in names}


def _stat(v: dict | None) -> dict | None:
    return (
        None if not v or v.get("mean") is None else {"mean": v["mean"], "ci95": v["ci95"], "n_tasks": v.get("n_tasks")}
    )


def ablation_rows(training: dict, fidelity: dict, diag: dict | None) -> list[dict]:
    """One row per set: training, fidelity at k = 1 (and its null), the diagnostic verdict and effects."""
    rows = []
    for name, t in training.items():
        f = fidelity.get(name, {})
        r = {"set": name, **t}
        if f:
            k1 = f["k"].index(1) if 1 in f["k"] else None
            null = f.get("controls", {}).get("shuffled")
            r["fidelity"] = {
                "top1_agreement_k1": f["top1_agreement"][k1] if k1 is not None else None,
                "ci95": f.get("top1_agreement_k1_ci"),
                "kl_k1": f["kl"][k1] if k1 is not None else None,
                "kl_ci95": f.get("kl_k1_ci"),
                "null_top1_agreement_k1": null["top1_agreement"][null["k"].index(1)]
                if null and 1 in null["k"]
                else None,
                "null_ci95": null.get("top1_agreement_k1_ci") if null else None,
                "n_tokens_k1": f["n_tokens"][k1] if k1 is not None else None,
                "top1_agreement": f["top1_agreement"],
                "k": f["k"],
            }
        if diag and name in diag.get("verdict_details", {}):
            v = diag["verdict_details"][name]
            b = v.get("beside", {})
            r["diagnostic"] = {
                "verdict": v["verdict"],
                "gate_passed": v["gate_passed"],
                "all": {"mean": v["mean_per_task_logp_diff"], "ci95": v["ci95"], "n_tasks": v["n_tasks"]},
                "failed": _stat(b.get("failed")),
                "solved": _stat(b.get("solved")),
                "vs_controls": {c: _stat(s) for c, s in v["vs_controls"].items()},
            }
        rows.append(r)
    return rows


def _ci(x, ci, digits=3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def ablation_markdown(s: dict) -> str:
    b = s["budget"]
    budget = (
        f"{b['time_budget_minutes']:g} min wall time per set"
        if b.get("time_budget_minutes")
        else f"{b['steps']} steps per set"
        if b.get("steps")
        else f"{b['epochs']:g} epochs per set"
    )
    lines = [
        "# Layer ablation of the aligned readout",
        "",
        f"Command: `{s.get('command') or '(library call)'}`",
        "",
        f"Every set trained with the same config (data `{s['data']}`, {s['n_samples']} samples, seed {b['seed']}, "
        f"budget {budget}, batch {b['batch_size']}, lr {b['lr']:g}, loss {b['loss']}, {b['draft_layers']} draft "
        "layers, "
        f"block size {b['block_size']}); only `target_layer_ids` differs. Aligned readouts (context <= anchor). "
        f"Device {s.get('device')}. Fidelity on {s.get('fidelity_sequences')} sequences (k = 1: the readout's "
        "next-token distribution vs the target's, null = the same readout on another sequence's features; 95% "
        "bootstrap CI over sequences). Diagnostic on the tasks of `diagnose/` (next mode; mean per-task log p_readout "
        "- log p_target; 95% CI over tasks).",
        "",
        "| set | layers | steps | train s | final loss | k=1 acc (train) | fidelity: top-1 agreement k=1 | null | KL "
        "k=1 | "
        "verdict | Δlog p vs target, all tasks | Δlog p, failed tasks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        f, d = r.get("fidelity") or {}, r.get("diagnostic") or {}
        fail = d.get("failed") or {}
        lines.append(
            " | ".join(
                [
                    f"| {r['set']}",
                    ",".join(map(str, r["layers"])),
                    f"{r['steps']}/{r['total_steps']}",
                    f"{r['elapsed_s']:.0f}",
                    "-" if r["final_loss"] is None else f"{r['final_loss']:.3f}",
                    "-" if r["final_acc_k1"] is None else f"{r['final_acc_k1']:.3f}",
                    _ci(f.get("top1_agreement_k1"), f.get("ci95")),
                    _ci(f.get("null_top1_agreement_k1"), f.get("null_ci95")),
                    _ci(f.get("kl_k1"), f.get("kl_ci95")),
                    d.get("verdict", "-"),
                    _ci((d.get("all") or {}).get("mean"), (d.get("all") or {}).get("ci95")),
                    _ci(fail.get("mean"), fail.get("ci95")) + " |",
                ]
            )
        )
    lines += [
        "",
        "Loss curves: `ablation.png` (left); per-set training logs in `sets/<set>/log.jsonl`; fidelity runs in "
        "`sets/<set>/fidelity/`; the diagnostic with all sets side by side in `diagnose/report.md`.",
        "",
        "![ablation](ablation.png)",
        "",
    ]
    return "\n".join(lines)


def run_ablation(
    target,
    tokenizer,
    data_dir,
    tasks: list[dict],
    out_dir,
    sets: list[list[int]],
    cfg,
    *,
    fidelity_samples=None,
    solved: dict | None = None,
    responses: dict | None = None,
    frame: str = "framed",
    controls=("shuffle", "gauss"),
    modes=("next",),
    n_boot: int = 1000,
    seed: int = 0,
    command: str | None = None,
    progress: bool = True,
) -> dict:
    """Train every set (`train_sets`), measure fidelity on `fidelity_samples` (a list of `fidelity.Sample`;
    None: skipped) and run the diagnostic on `tasks` (empty: skipped); write the table and the figure."""
    from draftguide.experiments.diagnose import run_diagnose
    from draftguide.experiments.fidelity import run_fidelity
    from draftguide.reporting.runs import environment, write_json
    from draftguide.training.data import read_samples

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    training = train_sets(target, tokenizer, data_dir, out_dir, sets, cfg, progress=progress)
    readouts = load_readouts(out_dir, list(training), target)
    fidelity = {}
    if fidelity_samples:
        for name, d in readouts.items():
            fs = run_fidelity(
                target,
                {name: d},
                fidelity_samples,
                out_dir / "sets" / name / "fidelity",
                n_boot=n_boot,
                seed=seed,
                progress=progress,
                settings={"layers": d.target_layer_ids},
            )
            fidelity[name] = fs["readouts"][name]
    diag = None
    if tasks:
        diag = run_diagnose(
            target,
            tokenizer,
            readouts,
            tasks,
            out_dir / "diagnose",
            modes=list(modes),
            controls=list(controls),
            solved=solved,
            responses=responses,
            frame=frame,
            n_boot=n_boot,
            seed=seed,
            progress=progress,
            command=command or "",
            settings={"readouts": {n: t["layers"] for n, t in training.items()}},
        )
    first = json.loads((out_dir / "sets" / set_name(sets[0]) / "train_config.json").read_text())
    budget = {
        k: first.get(k)
        for k in (
            "steps",
            "epochs",
            "seed",
            "batch_size",
            "lr",
            "loss",
            "draft_layers",
            "block_size",
            "anchors_per_seq",
            "max_len",
            "train_offsets",
            "vocab_subset",
        )
    }
    budget["time_budget_minutes"] = cfg.time_budget_s / 60 if cfg.time_budget_s else None
    s = {
        "kind": "ablate-layers",
        "sets": [list(x) for x in sets],
        "data": str(data_dir),
        "n_samples": sum(1 for x in read_samples(data_dir) if len(x["input_ids"]) - x["prompt_len"] >= 2),
        "budget": budget,
        "device": str(next(target.parameters()).device),
        "fidelity_sequences": len(fidelity_samples or []),
        "rows": ablation_rows(training, fidelity, diag),
        "diagnostic": {
            "n_tasks": diag["n_tasks"],
            "n_failed": diag["n_failed"],
            "n_solved": diag["n_solved"],
            "controls": diag["controls"],
        }
        if diag
        else None,
        "command": command,
        "environment": environment(),
    }
    write_json(out_dir / "summary.json", s)
    from draftguide.reporting.plots import ablation_figure

    logs = {r["set"]: _log(out_dir / "sets" / r["set"] / "log.jsonl") for r in s["rows"]}
    ablation_figure(s, logs, out_dir / "ablation.png")
    (out_dir / "ablation.md").write_text(ablation_markdown(s))
    return s


__all__ = [
    "DEFAULT_SETS",
    "ablation_markdown",
    "ablation_rows",
    "parse_layer_sets",
    "run_ablation",
    "set_name",
    "train_sets",
]
