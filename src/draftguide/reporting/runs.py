"""Run folders: append-and-flush JSONL results, JSON summaries, environment stamps, bootstrap CIs."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import numpy as np


def finite(obj):
    """`obj` with every NaN or infinite float (Python, numpy or a 0-d tensor) replaced by None, containers
    walked: output JSON holds `null` where a figure is undefined (a mean over nothing), never NaN/Infinity,
    which strict parsers reject."""
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite(obj.tolist())
    return obj


def dumps(obj, **kw) -> str:
    """The one JSON encoder of every output file and server reply: non-finite numbers become null, and
    `allow_nan=False` makes any that slip past a loud error rather than an unreadable file."""
    return json.dumps(finite(obj), allow_nan=False, default=_jsonable, **kw)


def fmt(x, spec: str = ".2f", missing: str = "-") -> str:
    """A table figure: `missing` for None or a non-finite number (say in the table why it is missing)."""
    if x is None or (isinstance(x, float | np.floating) and not math.isfinite(x)):
        return missing
    return format(x, spec)


class JsonlWriter:
    """Appends one JSON object per line and flushes each, so an interrupted run keeps every finished row."""

    def __init__(self, path: str | Path, mode: str = "a"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if mode == "a" and self.path.is_file():
            _drop_torn_line(self.path)
        self._f = self.path.open(mode, encoding="utf-8")

    def write(self, row: dict) -> None:
        self._f.write(dumps(row) + "\n")
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
    tmp.write_text(dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return finite(x)
    if hasattr(x, "tolist") and getattr(x, "ndim", None) == 0:  # a 0-d tensor
        return finite(x.tolist())
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


# -- report.md ----------------------------------------------------------------------------------------
def fmt_ci(stat: dict, key: str, digits: int = 2) -> str:
    lo, hi = stat["ci95"]
    return f"{stat[key]:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
