"""Every JSON file the project commits parses under a strict parser (no NaN or Infinity)."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(p for d in ("benchmarks", "src", "tests") for p in (ROOT / d).rglob("*.json"))


def _refuse(token):
    raise ValueError(f"non-finite number {token} in JSON")


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_json_is_strict(path):
    json.loads(path.read_text(encoding="utf-8-sig"), parse_constant=_refuse)


def test_the_check_sees_files_and_rejects_nan():
    assert len(FILES) > 10
    with pytest.raises(ValueError):
        json.loads('{"a": NaN}', parse_constant=_refuse)
