"""FR-Spec proposal heads (arXiv 2502.14856) against the full head: speed of lossless speculative decoding
with the draft proposing from the V most frequent tokens, in one run against plain greedy decoding of the
same target (T=0). Per prompt, every configuration runs back to back (greedy, HF generate, then each head)
so machine noise hits all of them alike. Output tokens must equal greedy's (checked, `lossless`).

    OMP_NUM_THREADS=1 python benchmarks/bench_frspec.py --sets mtbench,humaneval,sharegpt-heldout --limit 5 \
        --vocabs full,32768,16384,8192 --draft-dtypes float32,bfloat16 --out benchmarks/results/issue13/frspec.json
"""

from __future__ import annotations

import argparse
import copy

import torch

from draftguide import load_draft, load_target, speculative_generate
from draftguide.decode.speculative import (
    SubsetHead,
    greedy_generate,
    hf_generate,
    load_draft_vocab,
    measure_read_costs,
    measure_verify_costs,
)
from draftguide.modeling.prompts import encode_prompt, stop_token_ids
from draftguide.reporting.runs import bootstrap_ci, environment, write_json
from draftguide.training.datasources import load_source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--draft", default="smollm2-135m-dflash")
    ap.add_argument("--sets", default="mtbench,humaneval,sharegpt-heldout")
    ap.add_argument("--limit", type=int, default=5, help="prompts per set")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--vocabs", default="full,32768,16384,8192", help="'full' or a subset size V, comma-separated")
    ap.add_argument("--draft-dtypes", default="float32", help="draft dtypes, comma-separated (float32, bfloat16)")
    ap.add_argument("--verify-len", default="auto", help="'auto' (the CPU default), 'full' or N")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target, tok = load_target(args.target)
    draft = load_draft(args.draft, target=target)
    stop = stop_token_ids(tok, target)
    configs = {}  # "V/dtype" -> (draft, head or None)
    for dt in args.draft_dtypes.split(","):
        d = copy.deepcopy(draft).to(getattr(torch, dt))
        for v in args.vocabs.split(","):
            configs[f"{v}/{dt}"] = (
                d,
                None if v == "full" else SubsetHead(d, target, load_draft_vocab(args.draft, int(v))),
            )
    verify_costs = measure_verify_costs(target, max_tokens=draft.block_size) if args.verify_len == "auto" else None
    read_costs = {c: measure_read_costs(target, d, draft_head=h) for c, (d, h) in configs.items()}
    fixed = None if args.verify_len in ("auto", "full") else int(args.verify_len)
    prompts = [encode_prompt(tok, row) for name in args.sets.split(",") for row in load_source(name, limit=args.limit)]
    warm = prompts[0][:, :8]  # one-off allocation and kernel selection costs
    greedy_generate(target, warm, 4)
    for d, h in configs.values():
        speculative_generate(target, d, warm, 4, draft_head=h)

    base = {"greedy": [0, 0.0], "hf_generate": [0, 0.0]}
    spec = {c: {"tokens": 0, "s": 0.0, "steps": [], "tau": [], "lossless": True} for c in configs}
    for i, ids in enumerate(prompts):
        ref, st = greedy_generate(target, ids, args.max_new_tokens, stop)
        base["greedy"][0] += st.num_new_tokens
        base["greedy"][1] += st.total_s
        _, st = hf_generate(target, ids, args.max_new_tokens, stop)
        base["hf_generate"][0] += st.num_new_tokens
        base["hf_generate"][1] += st.total_s
        for v, (d, h) in configs.items():
            out, st = speculative_generate(
                target,
                d,
                ids,
                args.max_new_tokens,
                stop_token_ids=stop,
                verify_len=fixed,
                verify_costs=verify_costs,
                read_costs=read_costs[v] if verify_costs else None,
                draft_head=h,
            )
            r = spec[v]
            r["tokens"] += st.num_new_tokens
            r["s"] += st.total_s
            r["steps"] += st.acceptance_lengths
            r["tau"].append(st.tau)
            r["lossless"] &= out.tolist() == ref.tolist()
        print(f"prompt {i + 1}/{len(prompts)}", flush=True)

    rates = {k: n / s for k, (n, s) in base.items()}
    best = max(rates, key=rates.get)
    results = {}
    for v, r in spec.items():
        tps = r["tokens"] / r["s"]
        results[v] = {
            "draft_vocab": None if v.startswith("full") else int(v.split("/")[0]),
            "draft_dtype": v.split("/")[1],
            "tau": sum(r["steps"]) / len(r["steps"]),
            "tau_ci95_over_prompts": bootstrap_ci(r["tau"]),
            "tokens_per_s": tps,
            "speedup_vs_best_baseline": tps / rates[best],
            "read_cost_1_offset_s": read_costs[v][0],
            "read_costs_s": read_costs[v],
            "lossless": r["lossless"],
        }
        print(
            f"V={v}: tau {results[v]['tau']:.3f}  {tps:.2f} tokens/s  {tps / rates[best]:.3f}x {best}  "
            f"read(1 offset) {1e3 * read_costs[v][0]:.1f} ms  lossless {r['lossless']}",
            flush=True,
        )
    print(f"greedy {rates['greedy']:.2f} tokens/s, hf_generate {rates['hf_generate']:.2f} tokens/s")
    if args.out:
        write_json(
            args.out,
            {
                "draft": args.draft,
                "sets": args.sets,
                "n_prompts": len(prompts),
                "max_new_tokens": args.max_new_tokens,
                "verify_len": args.verify_len,
                "verify_costs_s": verify_costs,
                "baseline_method": best,
                "greedy_tokens_per_s": rates["greedy"],
                "hf_generate_tokens_per_s": rates["hf_generate"],
                "heads": results,
                "threads": args.threads,
                "environment": environment(),
            },
        )


if __name__ == "__main__":
    main()
