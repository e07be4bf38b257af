"""Run folders: append-and-flush JSONL results, JSON summaries, environment stamps, bootstrap CIs."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np


class JsonlWriter:
    """Appends one JSON object per line and flushes each, so an interrupted run keeps every finished row."""

    def __init__(self, path: str | Path, mode: str = "a"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if mode == "a" and self.path.is_file():
            _drop_torn_line(self.path)
        self._f = self.path.open(mode)

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _drop_torn_line(path: Path) -> None:
    """Cut a last line left unfinished by a crash, so that appending does not glue a new row onto it."""
    with path.open("rb+") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.seek(0)
            data = f.read()
            f.truncate(data.rfind(b"\n") + 1)


def write_json(path: str | Path, obj) -> None:
    """Atomic JSON write (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


COMMAND_FILE = "command.txt"


def record_command(out_dir: str | Path, command: str) -> None:
    """The command line that produced a run folder, for `draftguide report` captions (rank 0 under torchrun)."""
    out_dir = Path(out_dir)
    if out_dir.is_dir() and os.environ.get("RANK", "0") == "0":
        (out_dir / COMMAND_FILE).write_text(command + "\n")


def read_command(run_dir: str | Path, summary: dict | None = None) -> str:
    """The run's command: `summary["command"]` when the run recorded it there, else `command.txt`."""
    if summary and summary.get("command"):
        return summary["command"]
    path = Path(run_dir) / COMMAND_FILE
    return path.read_text().strip() if path.is_file() else "(not recorded)"


def environment() -> dict:
    import torch
    import transformers

    import draftguide

    return {
        "draftguide": draftguide.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def bootstrap_ci(values, stat=np.mean, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of `stat` over `values` (resampling items)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_boot, v.size))
    stats = np.apply_along_axis(stat, 1, v[idx]) if stat is not np.mean else v[idx].mean(1)
    return float(np.quantile(stats, alpha / 2)), float(np.quantile(stats, 1 - alpha / 2))
