"""Speed of draft-guided decoding on one target/draft pair, both ratios measured in one run:

- token-by-token guided decoding: seconds per token relative to plain greedy (goal: <= 1.25x);
- exact speculative guided greedy: speedup over the best plain greedy decoding the project has (our
  `greedy_generate` or HF `generate`, whichever is faster here; goal: >= 1.2x).

Each draft dtype in --draft-dtypes (the draft next to the same fp32 target) and each speculative verify
length in --verify-lens is its own method; all share one greedy baseline. Prompts are the first tasks of the
built-in context-learning suite (the workload guidance is meant for). Methods alternate per prompt and
repeat; each takes its best time per prompt. No stop tokens, so every method but HF generate (which may stop
at the model's EOS) produces exactly --max-new-tokens tokens; rates are seconds per token of each method's
own output (prefill included). Also checks that speculative guided output is identical to token-by-token
guided output with the same draft.

    OMP_NUM_THREADS=1 python benchmarks/bench_guided.py [--draft DIR] [--beta 0.5] [--n-tasks 8]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from tqdm.auto import tqdm

from draftguide.decode.guided import guided_generate
from draftguide.decode.speculative import greedy_generate, hf_generate
from draftguide.experiments.evaluate import load_tasks
from draftguide.modeling.draft_io import resolve_draft
from draftguide.modeling.prompts import encode_prompt
from draftguide.modeling.targets import load_target
from draftguide.reporting.runs import environment, write_json


def methods(target, drafts: dict, beta: float, verify_lens: list[int]):
    """name -> fn(ids, n) -> (tokens, stats). Guided methods are named `guided@DTYPE` and
    `guided_speculative@DTYPE/vN` (N drafted tokens verified per step)."""
    fns = {
        "greedy": lambda ids, n: greedy_generate(target, ids, n),
        "hf_generate": lambda ids, n: hf_generate(target, ids, n),
    }
    for dt, d in drafts.items():
        fns[f"guided@{dt}"] = lambda ids, n, d=d: guided_generate(target, d, ids, beta=beta, max_new_tokens=n)
        for v in verify_lens:
            fns[f"guided_speculative@{dt}/v{v}"] = lambda ids, n, d=d, v=v: guided_generate(
                target, d, ids, beta=beta, max_new_tokens=n, speculative=True, verify_len=v
            )
    return fns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--draft", default=None, help="draft folder, 'init', or the shipped draft (default)")
    ap.add_argument(
        "--draft-dtypes", default="float32,bfloat16", help="comma list: the draft's dtype(s), target stays fp32"
    )
    ap.add_argument("--verify-lens", default="2,7", help="comma list of drafted tokens verified per speculative step")
    ap.add_argument("--tasks", default="builtin")
    ap.add_argument("--n-tasks", type=int, default=8)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/guided.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    target, tok = load_target(args.target, device=args.device)
    base = resolve_draft(args.draft, target, tok, target_name=args.target).to(args.device)
    names = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    drafts = {
        names.get(dt, dt): copy.deepcopy(base).to(getattr(torch, names.get(dt, dt)))
        for dt in args.draft_dtypes.split(",")
    }
    verify_lens = [min(int(v), base.block_size - 1) for v in args.verify_lens.split(",")]
    tasks = load_tasks(args.tasks)[0]
    step = max(1, len(tasks) // args.n_tasks)  # spread over the suite's subcategories
    prompts = [encode_prompt(tok, t).to(args.device) for t in tasks[::step][: args.n_tasks]]
    fns = methods(target, drafts, args.beta, verify_lens)
    for fn in fns.values():  # warm-up
        fn(prompts[0][:, :16], 4)

    rows, totals, n_tok = [], {k: 0.0 for k in fns}, {k: 0 for k in fns}
    accepted, identical = {k: [] for k in fns}, {dt: True for dt in drafts}
    for i, ids in enumerate(tqdm(prompts, desc="bench_guided")):
        best, decode, outs = {k: float("inf") for k in fns}, {}, {}
        for r in range(args.repeats):
            for name in list(fns) if (i + r) % 2 == 0 else list(fns)[::-1]:  # alternate the order
                t0 = time.perf_counter()
                out, st = fns[name](ids, args.max_new_tokens)
                best[name] = min(best[name], time.perf_counter() - t0)
                if st.prefill_s > 0:  # ours time the prefill apart: decode-only seconds per token too
                    decode[name] = min(decode.get(name, float("inf")), st.decode_s / max(st.num_new_tokens - 1, 1))
                outs[name] = (out, st)
        for k in fns:
            if k.startswith("guided_speculative@"):
                dt = k.split("@")[1].split("/")[0]
                accepted[k] += outs[k][1].acceptance_lengths
                identical[dt] &= outs[k][0].tolist() == outs[f"guided@{dt}"][0].tolist()
        n = {k: outs[k][0].shape[1] - ids.shape[1] for k in fns}  # HF generate may stop at its own EOS
        for k in fns:
            totals[k] += best[k]
            n_tok[k] += n[k]
        rows.append(
            {
                "prompt_tokens": ids.shape[1],
                "new_tokens": n,
                "seconds": best,
                "decode_s_per_token": decode,
                "flips": {dt: len(outs[f"guided@{dt}"][1].flips) for dt in drafts},
            }
        )

    per_tok = {k: totals[k] / n_tok[k] for k in fns}
    plain = min(("greedy", "hf_generate"), key=per_tok.get)

    def decode_ratio(k):
        return sum(r["decode_s_per_token"][k] for r in rows) / sum(r["decode_s_per_token"]["greedy"] for r in rows)

    by_dtype = {}
    for dt in drafts:
        spec = {v: per_tok[plain] / per_tok[f"guided_speculative@{dt}/v{v}"] for v in verify_lens}
        best_v = max(spec, key=spec.get)
        by_dtype[dt] = {
            "guided_cost_vs_greedy": per_tok[f"guided@{dt}"] / per_tok["greedy"],
            "guided_decode_cost_vs_greedy": decode_ratio(f"guided@{dt}"),  # prefill excluded
            "speculative_guided_speedup_vs_best_plain": {f"v{v}": x for v, x in spec.items()},
            "speculative_guided_tau": {
                f"v{v}": sum(a) / len(a) for v in verify_lens if (a := accepted[f"guided_speculative@{dt}/v{v}"])
            },
            "best_verify_len": best_v,
            "speculative_identical_to_token_by_token": identical[dt],
            "goals_met": {
                "guided_cost": per_tok[f"guided@{dt}"] / per_tok["greedy"] <= 1.25,
                "speculative_speedup": spec[best_v] >= 1.2,
            },
        }
    res = {
        "target": args.target,
        "target_dtype": "float32",
        "draft": args.draft or "shipped",
        "beta": args.beta,
        "block_size": base.block_size,
        "n_prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "device": args.device,
        "threads": args.threads,
        "goals": {"guided_cost_vs_greedy": 1.25, "speculative_guided_speedup_vs_best_plain": 1.2},
        "best_plain_method": plain,
        "seconds_per_token": per_tok,
        "by_draft_dtype": by_dtype,
        "prompts": rows,
        "environment": environment(),
    }
    write_json(args.out, res)
    print("s/token: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in per_tok.items()))
    for dt, r in by_dtype.items():
        v = r["best_verify_len"]
        print(
            f"draft {dt}: guided / greedy cost per token {r['guided_cost_vs_greedy']:.3f} (goal <= 1.25; decode only "
            f"{r['guided_decode_cost_vs_greedy']:.3f}); speculative guided speedup vs {plain} "
            f"{r['speculative_guided_speedup_vs_best_plain'][f'v{v}']:.3f} at verify_len {v} (goal >= 1.2), "
            f"tau {r['speculative_guided_tau'].get(f'v{v}', float('nan')):.2f}, identical "
            f"{r['speculative_identical_to_token_by_token']}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
