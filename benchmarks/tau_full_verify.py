"""Acceptance length of a draft with the whole block verified (no adaptive verify): a pure measure of
the draft, independent of the machine's cost curve. T=0, tokens identical to plain greedy.

    python benchmarks/tau_full_verify.py --draft src/draftguide/models/smollm2-135m-dflash \
        --sets mtbench,humaneval,sharegpt-heldout --limit 10 --max-new-tokens 64 \
        --out benchmarks/results/tau_full_verify.json
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from draftguide import load_draft, load_target, speculative_generate
from draftguide.modeling.prompts import encode_prompt, stop_token_ids
from draftguide.reporting.runs import bootstrap_ci, environment, write_json
from draftguide.training.datasources import load_source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--draft", required=True)
    ap.add_argument("--sets", default="mtbench,humaneval")
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target, tok = load_target(args.target)
    draft = load_draft(args.draft, target=target)
    stop = stop_token_ids(tok, target)
    results = {}
    for name in args.sets.split(","):
        taus, hist = [], np.zeros(draft.block_size, dtype=int)
        for row in load_source(name, limit=args.limit):
            _, st = speculative_generate(
                target, draft, encode_prompt(tok, row), args.max_new_tokens, stop_token_ids=stop
            )
            taus.append(st.tau)
            for a in st.acceptance_lengths:
                hist[a - 1] += 1
        results[name] = {
            "n_prompts": len(taus),
            "tau": float(np.mean(taus)),
            "tau_ci95_over_prompts": bootstrap_ci(taus),
            "acceptance_histogram": hist.tolist(),
        }
        print(
            f"{name}: tau {results[name]['tau']:.3f} {results[name]['tau_ci95_over_prompts']} hist {hist.tolist()}",
            flush=True,
        )
    if args.out:
        write_json(
            args.out,
            {
                "draft": args.draft,
                "max_new_tokens": args.max_new_tokens,
                "verify_len": draft.block_size - 1,
                "sets": results,
                "environment": environment(),
            },
        )


if __name__ == "__main__":
    main()
