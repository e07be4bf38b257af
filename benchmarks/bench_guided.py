"""Speed of draft-guided decoding on one target/draft pair, both ratios measured in one run:

- token-by-token guided decoding: seconds per token relative to plain greedy (goal: <= 1.25x);
- exact speculative guided greedy: speedup over the best plain greedy decoding the project has (our
  `greedy_generate` or HF `generate`, whichever is faster here; goal: >= 1.2x).

Prompts are the first tasks of the built-in context-learning suite (the workload guidance is meant for).
Methods alternate per prompt and repeat; each takes its best time per prompt. No stop tokens, so every
method but HF generate (which may stop at the model's EOS) produces
exactly --max-new-tokens tokens; rates are seconds per token of each method's own output (prefill included). Also checks that speculative guided output is identical
to token-by-token guided output.

    OMP_NUM_THREADS=1 python benchmarks/bench_guided.py [--draft DIR] [--beta 0.5] [--n-tasks 8]
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm

from draftguide.draft import resolve_draft
from draftguide.evaluate import load_tasks
from draftguide.guided import guided_generate
from draftguide.prompts import encode_prompt
from draftguide.runs import environment, write_json
from draftguide.speculative import greedy_generate, hf_generate
from draftguide.targets import load_target


def methods(target, draft, beta: float):
    """name -> fn(ids, n) -> (tokens, stats with .acceptance_lengths or None)."""
    return {
        "greedy": lambda ids, n: greedy_generate(target, ids, n),
        "hf_generate": lambda ids, n: hf_generate(target, ids, n),
        "guided": lambda ids, n: guided_generate(target, draft, ids, beta=beta, max_new_tokens=n),
        "guided_speculative": lambda ids, n: guided_generate(target, draft, ids, beta=beta, max_new_tokens=n, speculative=True),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--draft", default=None, help="draft folder, 'init', or the shipped draft (default)")
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
    draft = resolve_draft(args.draft, target, tok, target_name=args.target).to(args.device)
    tasks = load_tasks(args.tasks)[0]
    step = max(1, len(tasks) // args.n_tasks)  # spread over the suite's subcategories
    prompts = [encode_prompt(tok, t).to(args.device) for t in tasks[::step][: args.n_tasks]]
    fns = methods(target, draft, args.beta)
    for fn in fns.values():  # warm-up
        fn(prompts[0][:, :16], 4)

    rows, totals, n_tok = [], {k: 0.0 for k in fns}, {k: 0 for k in fns}
    accepted, identical = [], True
    for i, ids in enumerate(tqdm(prompts, desc="bench_guided")):
        best, decode, outs = {k: float("inf") for k in fns}, {}, {}
        for r in range(args.repeats):
            for name in (list(fns) if (i + r) % 2 == 0 else list(fns)[::-1]):  # alternate the order
                t0 = time.perf_counter()
                out, st = fns[name](ids, args.max_new_tokens)
                best[name] = min(best[name], time.perf_counter() - t0)
                if st.prefill_s > 0:  # ours time the prefill apart: decode-only seconds per token too
                    decode[name] = min(decode.get(name, float("inf")), st.decode_s / max(st.num_new_tokens - 1, 1))
                outs[name] = (out, st)
        identical &= outs["guided"][0].tolist() == outs["guided_speculative"][0].tolist()
        accepted += outs["guided_speculative"][1].acceptance_lengths
        n = {k: outs[k][0].shape[1] - ids.shape[1] for k in fns}  # HF generate may stop at its own EOS
        for k in fns:
            totals[k] += best[k]
            n_tok[k] += n[k]
        rows.append({"prompt_tokens": ids.shape[1], "new_tokens": n, "seconds": best, "decode_s_per_token": decode,
                     "flips": len(outs["guided"][1].flips)})

    per_tok = {k: totals[k] / n_tok[k] for k in fns}
    plain = min(("greedy", "hf_generate"), key=per_tok.get)
    res = {
        "target": args.target, "draft": args.draft or "shipped", "beta": args.beta, "block_size": draft.block_size,
        "n_prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "device": args.device,
        "seconds_per_token": per_tok,
        "guided_cost_vs_greedy": per_tok["guided"] / per_tok["greedy"],
        "guided_decode_cost_vs_greedy": sum(r["decode_s_per_token"]["guided"] for r in rows)
        / sum(r["decode_s_per_token"]["greedy"] for r in rows),  # prefill excluded
        "guided_cost_goal": 1.25,
        "best_plain_method": plain,
        "speculative_guided_speedup_vs_best_plain": per_tok[plain] / per_tok["guided_speculative"],
        "speculative_guided_speedup_goal": 1.2,
        "speculative_guided_tau": sum(accepted) / len(accepted),
        "speculative_identical_to_token_by_token": identical,
        "prompts": rows, "environment": environment(),
    }
    res["goals_met"] = {"guided_cost": res["guided_cost_vs_greedy"] <= 1.25,
                        "speculative_speedup": res["speculative_guided_speedup_vs_best_plain"] >= 1.2}
    write_json(args.out, res)
    print(f"s/token: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in per_tok.items()))
    print(f"guided / greedy cost per token: {res['guided_cost_vs_greedy']:.3f} (goal <= 1.25); "
          f"decode only {res['guided_decode_cost_vs_greedy']:.3f}")
    print(f"speculative guided speedup vs {plain}: {res['speculative_guided_speedup_vs_best_plain']:.3f} (goal >= 1.2), "
          f"tau {res['speculative_guided_tau']:.2f}, identical {identical}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
