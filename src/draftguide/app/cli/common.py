"""What every command group shares: target/draft arguments and loading, device and dtype choice, task sources,
draft specs and the closing table of a command. Heavy libraries are imported inside functions, so building
the parser (and `--help`) stays fast."""

from __future__ import annotations

import argparse
import os

from draftguide.errors import DraftGuideError
from draftguide.modeling.targets import DEFAULT_TARGET

DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


# -- argument types --------------------------------------------------------------------------------------
def int_list(text: str) -> list[int]:
    """argparse type: a comma list of integers."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected a comma list of integers") from None


def comma_list(text: str) -> list[str]:
    """The non-empty, stripped items of a comma list ('' gives [])."""
    return [x.strip() for x in text.split(",") if x.strip()]


def template_kwargs_arg(text: str) -> dict:
    """argparse type of --chat-template-kwargs: a JSON object of chat-template variables."""
    from draftguide.modeling.prompts import check_chat_template_kwargs

    try:
        return check_chat_template_kwargs(text)
    except DraftGuideError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# -- target and draft arguments -----------------------------------------------------------------------------
def add_target_args(
    p: argparse.ArgumentParser, device: str | None = None, draft: bool = False, draft_dtype: bool = True
) -> None:
    """--target, --dtype, --device (None: cuda:LOCAL_RANK when a GPU is there, else cpu), and --draft (with
    --draft-dtype for commands that load the pair through `load_models`)."""
    p.add_argument(
        "--target", default=DEFAULT_TARGET, help=f"alias, local HF folder or hub id (default {DEFAULT_TARGET})"
    )
    if draft:
        p.add_argument(
            "--draft",
            default=None,
            help="DFlash draft folder, or 'init[:LAYERS]' for an untrained draft (default: the shipped draft of the "
            "target)",
        )
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    if draft and draft_dtype:
        p.add_argument(
            "--draft-dtype",
            default=None,
            choices=sorted(DTYPES),
            help="the draft's dtype (default: the target's); bfloat16 speeds up a draft next to an fp32 CPU target",
        )
    p.add_argument(
        "--device", default=device, help="default: cuda:LOCAL_RANK if available, else cpu" if device is None else None
    )
    p.add_argument(
        "--chat-template-kwargs",
        default=None,
        type=template_kwargs_arg,
        metavar="JSON",
        help="extra chat-template variables wherever a chat template is applied, e.g. "
        "'{\"enable_thinking\": false}' for Qwen3 (the vLLM/SGLang flag)",
    )


def torch_dtype(name: str):
    """The torch dtype of a --dtype / --draft-dtype choice (e.g. 'bf16' -> torch.bfloat16)."""
    import torch

    return getattr(torch, DTYPES[name])


def resolve_device(args, per_rank: bool = False) -> str:
    """--device, else a GPU when there is one (with `per_rank`: cuda:LOCAL_RANK, one GPU per torchrun
    process; else plain 'cuda'), else cpu."""
    import torch

    if args.device:
        return args.device
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if per_rank else "cuda"


def with_template(args, tok):
    """The tokenizer with --chat-template-kwargs applied to every later chat template."""
    from draftguide.modeling.prompts import set_chat_template_kwargs

    set_chat_template_kwargs(tok, getattr(args, "chat_template_kwargs", None))
    return tok


def load_target_from_args(args, device: str):
    """(target, tokenizer) from --target and --dtype on `device`, --chat-template-kwargs applied."""
    from draftguide.modeling.targets import load_target

    target, tok = load_target(args.target, dtype=torch_dtype(args.dtype), device=device)
    return target, with_template(args, tok)


def load_models(args):
    """Target, tokenizer and a draft checked against the target."""
    from draftguide.app.pipeline import load_pair

    draft_dtype = getattr(args, "draft_dtype", None)
    target, tok, draft = load_pair(
        args.target, args.draft, DTYPES[args.dtype], args.device, draft_dtype and DTYPES[draft_dtype]
    )
    return target, with_template(args, tok), draft


def draft_spec(args, purpose: str = "guidance", spec: str | None = None) -> str:
    """The draft as a JSON-able option: an absolute folder, `init[:N]`, or the target's shipped draft for
    `purpose` (guidance: the aligned readout when shipped, else the speculative draft; speculative: the
    speculative draft). A speculative purpose refuses an aligned readout with one line."""
    from draftguide.modeling.draft_io import check_speculative_spec, draft_path, shipped_draft

    spec = args.draft if spec is None else spec
    if spec is None:
        shipped = shipped_draft(args.target, purpose)
        if shipped is None:
            raise DraftGuideError(f"no shipped draft for target '{args.target}': pass --draft PATH")
        return str(shipped)
    if spec.startswith("init"):
        return spec
    path = draft_path(spec)
    if not path.exists():
        raise DraftGuideError(f"draft folder '{spec}' does not exist")
    if purpose == "speculative":
        check_speculative_spec(spec)
    return str(path.resolve())


def default_draft(args, purpose: str) -> None:
    """Commands that load the pair through `load_models`: pick the shipped draft for `purpose` when no --draft
    is given (guidance: the aligned readout), and refuse an aligned readout for speculation before loading."""
    from draftguide.modeling.draft_io import check_speculative_spec, shipped_draft

    if args.draft is None:
        shipped = shipped_draft(args.target, purpose)
        args.draft = None if shipped is None else str(shipped)
    elif purpose == "speculative":
        check_speculative_spec(args.draft)


def readout_names(specs: list[str | None], target: str | None = None) -> list[str]:
    """Names of several readouts (`diagnose --drafts`, `fidelity --draft A,B`): a folder's name, the init spec, or
    the target's shipped draft for None; repeats (run1/draft, run2/draft) get a suffix, so none is dropped."""
    from draftguide.modeling.draft_io import draft_path

    names: list[str] = []
    for spec in specs:
        if spec is None:
            base = f"{target} (shipped draft)"
        else:
            base = spec if spec.startswith("init") else draft_path(spec).resolve().name
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


# -- tasks and output ---------------------------------------------------------------------------------------
def task_source(tasks: str) -> str:
    """--tasks as recorded in a run's settings: 'builtin', or the file's absolute path."""
    from pathlib import Path

    return tasks if tasks == "builtin" else str(Path(tasks).resolve())


def load_task_rows(args) -> list[dict]:
    """The first --limit rows of --tasks (malformed rows are an error)."""
    from draftguide.experiments.evaluate import load_tasks

    return load_tasks(args.tasks)[0][: args.limit]


def print_table(table: str, wrote: str | None = None, blank_line: bool = True) -> None:
    """A command's closing output on stdout: a blank line (`blank_line`), the table, then 'wrote ...'."""
    print("\n" + table if blank_line else table)
    if wrote is not None:
        print(f"wrote {wrote}")
