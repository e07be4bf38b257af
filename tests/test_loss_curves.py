"""benchmarks/loss_curves.py: equal-budget training runs summarised from their logs and held-out fidelity."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("loss_curves", ROOT / "benchmarks" / "loss_curves.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(d: Path, loss: str, agree: list[float], labels_per_row: int) -> None:
    d.mkdir()
    rows = [
        {"step": 5 * (i + 1), "agree": [a, a / 2], "labels_seen": labels_per_row * (i + 1), "elapsed_s": 10.0 * (i + 1)}
        for i, a in enumerate(agree)
    ]
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "train_config.json").write_text(json.dumps({"loss": loss, "lr": 1e-3, "time_budget_s": 60.0}))


def test_loss_curves_summarise_runs_and_draw(tmp_path, monkeypatch):
    _run(tmp_path / "ce", "ce", [0.1, 0.2, 0.3, 0.4], 100)
    _run(tmp_path / "kd", "kd", [0.2, 0.4, 0.5, 0.6], 50)
    fid = tmp_path / "fid-kd"
    fid.mkdir()
    readout = {
        "k": [1, 2],
        "top1_agreement": [0.55, 0.3],
        "kl": [1.0, 2.0],
        "top1_agreement_k1_ci": [0.5, 0.6],
        "kl_k1_ci": [0.9, 1.1],
        "controls": {"shuffle": {"k": [1, 2], "top1_agreement": [0.05, 0.02]}},
    }
    (fid / "summary.json").write_text(json.dumps({"readouts": {"d": readout}}))
    out = tmp_path / "out"
    argv = ["loss_curves.py", "--runs", f"ce={tmp_path / 'ce'},kd={tmp_path / 'kd'}", "--fidelity", f"kd={fid}"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    _module().main()
    s = json.loads((out / "curves.json").read_text())["runs"]
    assert s["ce"]["labels_seen"] == 400 and s["ce"]["labels_per_s"] == 10.0
    assert s["kd"]["labels_per_s"] == 5.0 and s["kd"]["loss"] == "kd"
    assert abs(s["kd"]["train_agreement_k1_last10"] - 0.425) < 1e-9
    assert "heldout" not in s["ce"]
    assert s["kd"]["heldout"]["top1_agreement"] == [0.55, 0.3]
    assert s["kd"]["heldout"]["null_top1_agreement"] == {"shuffle": [0.05, 0.02]}
    assert (out / "curves.png").stat().st_size > 1000
