"""The command line's parsers and closing tables, without loading a model: every (sub)command's `--help` exits 0,
commands keep their order, and the pure table functions print what the commands printed inline before."""

import argparse

import pytest

from draftguide.app.cli import build_parser, main
from draftguide.reporting import tables

COMMANDS = [
    "speculate",
    "make-data",
    "train-draft",
    "fidelity",
    "bench-tau",
    "tasks",
    "eval",
    "ablate-layers",
    "probe",
    "flips",
    "diagnose",
    "profile",
    "report",
    "serve",
    "ttt-tau",
    "sweep",
    "matrix",
    "generate",
]


def _subparsers(parser: argparse.ArgumentParser, path=()):
    """(argv path, parser) of every command and nested command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _subparsers(sub, (*path, name))


def test_commands_in_order():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == COMMANDS


@pytest.mark.parametrize("path", [p for p, _ in _subparsers(build_parser())], ids=" ".join)
def test_every_command_help_exits_0(path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: draftguide {' '.join(path)}")


def test_every_command_has_a_handler():
    for path, p in _subparsers(build_parser()):
        if not any(isinstance(a, argparse._SubParsersAction) for a in p._actions):
            assert callable(p._defaults.get("func")), path


def test_speculate_table():
    s = {"n_prompts": 2, "tau": None, "tokens_per_s": 12.34, "tau_missing": "no drafted tokens", "lossless": True}
    assert tables.speculate_table(s, baseline=False).splitlines() == [
        " prompts    tau    tok/s  base tok/s  speedup  lossless",
        "       2      -     12.3           -        -      True",
        "tau -: no drafted tokens",
        "base tok/s, speedup -: no baseline run (--no-baseline)",
    ]


def test_matrix_table_marks_the_difference_to_greedy():
    rows = [
        {"row": "greedy", "n": 16, "solve_rate": 0.5, "ci95": [0.25, 0.75]},
        {
            "row": "guided",
            "n": 16,
            "solve_rate": 0.5625,
            "ci95": [0.3, 0.8],
            "vs_greedy": {"mean_diff": 0.0625, "ci": [-0.1, 0.2]},
        },
    ]
    lines = tables.matrix_table({"rows": rows, "decision": "null"}).splitlines()
    assert lines[1].split() == ["greedy", "16", "0.500", "[0.25,", "0.75]"]
    assert lines[2].endswith("+0.062 [-0.10, +0.20]") and lines[-1] == "decision matrix: null"


def test_ttt_sweep_table_marks_the_best_point():
    a = dict(lr=1e-3, rank=8, steps=0, context_loss=2.0, logp_gap=0.1, tau=1.5, delta_tau=None)
    b = a | dict(steps=4, tau=1.75, delta_tau=0.25)
    lines = tables.ttt_sweep_table({"table": [a, b], "best": b}).splitlines()
    assert len(lines) == 3 and not lines[1].endswith("<- best") and lines[2].endswith("+0.250  <- best")


def test_ablation_table_shows_missing_figures_as_dashes():
    s = {
        "rows": [{"set": "27", "steps": 3, "total_steps": 4, "final_loss": None, "fidelity": None, "diagnostic": None}]
    }
    assert tables.ablation_table(s).splitlines()[1].split() == ["27", "3/4", "-", "-", "-", "-", "-", "-"]


def test_memory_summary_names_the_draft_only_when_there_is_one():
    m = dict(
        params=1.35e8,
        weight_bytes=2**29,
        dtype="float32",
        weight_bytes_read_per_token=2**29,
        expert_fraction=1.0,
        kv_bytes_per_token=30720,
        kv_bytes_at_context=2**27,
        draft_weight_bytes=2**26,
        feature_bytes_per_token=11520,
        total_bytes_at_context=2**30,
    )
    assert "draft" not in tables.memory_summary(m, 4096, draft=False)
    text = tables.memory_summary(m, 4096, draft=True)
    assert "; draft 0.06 GiB, features 11.2 KiB/token; total at 4096 tokens 1.00 GiB" in text
