"""Our speculative loop vs the official `dflash_generate`: same target, same draft weights, same prompts,
one process, alternating order. Writes JSON with per-prompt times and the ratio (official / ours; > 1
means ours is faster), and checks that both produce identical tokens and acceptance lengths.

    python benchmarks/bench_official.py [--target smollm2-135m] [--draft DIR|init] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import dflash.model as official
import torch

from draftguide.decode.speculative import measure_read_costs, measure_verify_costs, speculative_generate
from draftguide.modeling.draft_io import resolve_draft
from draftguide.modeling.prompts import BUILTIN_PROMPTS, encode_prompt, load_prompts, stop_token_ids
from draftguide.modeling.targets import load_target
from draftguide.reporting.runs import environment, write_json

official._cuda_time = lambda: (torch.cuda.synchronize() if torch.cuda.is_available() else None, time.perf_counter())[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--draft", default=None, help="draft folder, 'init', or the shipped draft (default)")
    ap.add_argument("--prompts", default="builtin")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/official_vs_ours.json")
    ap.add_argument(
        "--also-auto", action="store_true", help="also time ours with adaptive verification (no official counterpart)"
    )
    args = ap.parse_args()

    target, tok = load_target(args.target, device=args.device)
    draft = resolve_draft(args.draft, target, tok, target_name=args.target).to(args.device)
    ref = official.DFlashDraftModel(draft.config).to(args.device).eval()
    ref.load_state_dict(draft.state_dict())
    stop = stop_token_ids(tok, target)
    prompts = BUILTIN_PROMPTS if args.prompts == "builtin" else load_prompts(args.prompts)
    warm = encode_prompt(tok, prompts[0]).to(args.device)
    speculative_generate(target, draft, warm, 8, stop_token_ids=stop)
    official.dflash_generate(ref, target, warm, 8, stop)

    costs = measure_verify_costs(target, max_tokens=draft.block_size) if args.also_auto else None
    head = measure_read_costs(target, draft) if args.also_auto else None
    rows, ours_total, theirs_total, auto_total = [], 0.0, 0.0, 0.0
    for row in prompts:
        ids = encode_prompt(tok, row).to(args.device)
        t_ours, t_theirs = [], []
        for r in range(args.repeats):
            for which in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
                t0 = time.perf_counter()
                if which == "ours":
                    out, st = speculative_generate(target, draft, ids, args.max_new_tokens, stop_token_ids=stop)
                    t_ours.append(time.perf_counter() - t0)
                else:
                    res = official.dflash_generate(ref, target, ids, args.max_new_tokens, stop, return_stats=True)
                    t_theirs.append(time.perf_counter() - t0)
        same = out.tolist() == res.output_ids.tolist() and st.acceptance_lengths == res.acceptance_lengths
        auto_s = None
        if costs is not None:
            t0 = time.perf_counter()
            out_auto, _ = speculative_generate(
                target, draft, ids, args.max_new_tokens, stop_token_ids=stop, verify_costs=costs, read_costs=head
            )
            auto_s = time.perf_counter() - t0
            auto_total += auto_s
            same = same and out_auto.tolist() == out.tolist()
        ours_total += min(t_ours)
        theirs_total += min(t_theirs)
        rows.append(
            {
                "id": row.get("id"),
                "new_tokens": st.num_new_tokens,
                "tau": st.tau,
                "ours_s": min(t_ours),
                "official_s": min(t_theirs),
                "ours_auto_verify_s": auto_s,
                "identical": same,
            }
        )
        print(
            f"{row.get('id')}: ours {min(t_ours):.2f}s  official {min(t_theirs):.2f}s  tau {st.tau:.2f}  identical "
            f"{same}"
        )
    result = {
        "benchmark": "speculative loop: draftguide vs official dflash_generate (same weights, greedy)",
        "target": args.target,
        "draft": args.draft or "shipped",
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "timing": "best of repeats per prompt, order alternated",
        "ours_s": ours_total,
        "official_s": theirs_total,
        "ratio_official_over_ours": theirs_total / ours_total,
        "ours_auto_verify_s": auto_total if costs else None,
        "ratio_official_over_ours_auto_verify": theirs_total / auto_total if costs else None,
        "all_identical": all(r["identical"] for r in rows),
        "prompts": rows,
        "environment": environment(),
    }
    write_json(Path(args.out), result)
    print(f"ratio official/ours = {result['ratio_official_over_ours']:.3f} (> 1: ours faster); wrote {args.out}")


if __name__ == "__main__":
    main()
