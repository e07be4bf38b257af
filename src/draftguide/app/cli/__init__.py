"""`draftguide` command line: a thin layer over the library API."""

from __future__ import annotations

import argparse
import shlex
import sys

from draftguide.app.cli import analysis, decoding, diagnose, evaluation, training
from draftguide.app.cli.common import load_models
from draftguide.errors import DraftGuideError
from draftguide.reporting.runs import record_command

__all__ = ["build_parser", "load_models", "main"]

# one `add_*_parser(sub)` per command, in the order `draftguide --help` lists them
COMMANDS = (
    decoding.add_speculate_parser,
    training.add_make_data_parser,
    training.add_train_draft_parser,
    analysis.add_fidelity_parser,
    decoding.add_bench_tau_parser,
    evaluation.add_tasks_parser,
    evaluation.add_eval_parser,
    analysis.add_ablate_layers_parser,
    analysis.add_probe_parser,
    evaluation.add_flips_parser,
    diagnose.add_diagnose_parser,
    analysis.add_profile_parser,
    analysis.add_report_parser,
    decoding.add_serve_parser,
    training.add_ttt_tau_parser,
    evaluation.add_sweep_parser,
    analysis.add_matrix_parser,
    decoding.add_generate_parser,
)


def build_parser() -> argparse.ArgumentParser:
    """The `draftguide` parser: every command, each with its handler as `func`."""
    parser = argparse.ArgumentParser(prog="draftguide", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add_parser in COMMANDS:
        add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (2 with one 'draftguide: error:' line on a DraftGuideError, 130
    on Ctrl-C). A run folder (--out) records the command line that made it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars: noise next to our own progress
    args.argv = ["draftguide", *argv]  # what was run, recorded as is (no command line is rebuilt from options)
    args.command = shlex.join(args.argv)
    try:
        code = args.func(args)
        if code == 0 and getattr(args, "run_folder", True) and getattr(args, "out", None):
            record_command(args.out, args.command)
        return code
    except DraftGuideError as e:
        print(f"draftguide: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("draftguide: interrupted", file=sys.stderr)
        return 130
