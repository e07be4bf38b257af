"""The `speculate` command: speculative decoding over a prompt file, timed against plain greedy decoding and HF
`generate` in the same run; writes `results.jsonl` and `summary.json`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from draftguide.decode.speculative import (
    SubsetHead,
    default_verify_len,
    greedy_generate,
    hf_generate,
    measure_read_costs,
    measure_verify_costs,
    speculative_generate,
)
from draftguide.errors import DraftGuideError
from draftguide.modeling.draft import DFlashDraft
from draftguide.modeling.prompts import check_length, encode_prompt, place, stop_token_ids
from draftguide.modeling.sampling import check_sampling, effective_temperature, resolve_seed
from draftguide.modeling.text import decode_text
from draftguide.reporting.runs import JsonlWriter, bootstrap_ci, environment, write_json

TAU_MISSING = "no verify step ran: every generation ended at its first token (max_new_tokens 1, or a stop token)"


def run_speculate(
    target,
    tokenizer,
    draft: DFlashDraft,
    prompts: list[dict],
    out_dir,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    verify_len: int | str | None = None,
    seed: int | None = None,
    baseline: bool = True,
    progress: bool = True,
    draft_vocab: torch.Tensor | None = None,
) -> dict:
    """Speculative decoding over `prompts`, timed against plain greedy decoding of the same target in the
    same run. Writes `results.jsonl` (a row per prompt, flushed as it goes) and `summary.json`. `seed`: of the
    sampling at temperature > 0 (None: fresh randomness); the seed used is in the summary. `verify_len`: N,
    'auto', 'full' (the whole block) or None for the device's default (`default_verify_len`). `draft_vocab`:
    token ids the draft proposes from (FR-Spec, `SubsetHead`)."""
    check_sampling(temperature, top_p, top_k)
    seed = resolve_seed(seed)
    encoded = [(row, encode_prompt(tokenizer, row)) for row in prompts]  # validate every row before any work
    for row, ids in encoded:
        check_length(target, ids.shape[1], max_new_tokens, place(row))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = next(target.parameters()).device
    stop = stop_token_ids(tokenizer, target)
    gen = torch.Generator(device=dev).manual_seed(seed)
    # warm-up: first calls pay one-off allocation and kernel selection costs
    warm = encoded[0][1][:, :8].to(dev)
    speculative_generate(target, draft, warm, 4, stop_token_ids=stop)
    greedy_generate(target, warm, 4)
    costs = head = None
    dhead = SubsetHead(draft, target, draft_vocab) if draft_vocab is not None else None
    verify_len = default_verify_len(dev, temperature) if verify_len is None else verify_len
    if verify_len == "auto":
        costs = measure_verify_costs(target, max_tokens=draft.block_size)
        head = measure_read_costs(target, draft, draft_head=dhead)
        verify_len = None
    elif verify_len == "full":
        verify_len = None
    elif not isinstance(verify_len, int):
        raise DraftGuideError(f"verify_len must be an integer, 'auto' or 'full', got {verify_len!r}")

    rows, spec_tok, spec_s, base = [], 0, 0.0, {"greedy": [0, 0.0], "hf_generate": [0, 0.0]}
    with JsonlWriter(out_dir / "results.jsonl", mode="w") as w:
        for row, ids in tqdm(encoded, desc="speculate", disable=not progress):
            ids = ids.to(dev)
            tokens, st = speculative_generate(
                target,
                draft,
                ids,
                max_new_tokens,
                temperature,
                top_p,
                top_k,
                stop,
                verify_len,
                gen,
                costs,
                read_costs=head,
                draft_head=dhead,
            )
            new = tokens[0, ids.shape[1] :].tolist()
            rec = {
                "id": row.get("id"),
                "prompt_tokens": ids.shape[1],
                "new_tokens": len(new),
                "text": decode_text(tokenizer, new),
                "tokens": new,
                "acceptance_lengths": st.acceptance_lengths,
                "tau": st.tau,
                "prefill_s": st.prefill_s,
                "decode_s": st.decode_s,
                "tokens_per_s": len(new) / st.total_s,
            }
            spec_tok, spec_s = spec_tok + len(new), spec_s + st.total_s
            if baseline:
                for name, fn in (("greedy", greedy_generate), ("hf_generate", hf_generate)):
                    ref, bst = fn(target, ids, max_new_tokens, stop)
                    base[name][0] += bst.num_new_tokens
                    base[name][1] += bst.total_s
                    rec[f"{name}_tokens_per_s"] = bst.num_new_tokens / bst.total_s
                    if name == "hf_generate":
                        rec["identical_to_baseline"] = ref[0, ids.shape[1] :].tolist() == new
            w.write(rec)
            rows.append(rec)

    steps = [a for r in rows for a in r["acceptance_lengths"]]
    tps = spec_tok / spec_s
    summary = {
        "n_prompts": len(rows),
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
        "block_size": draft.block_size,
        "verify_len": "auto" if costs else (verify_len or draft.block_size - 1),
        "draft_vocab": None if dhead is None else len(dhead.ids),
        "draft_dtype": str(next(draft.parameters()).dtype).removeprefix("torch."),
        "verify_costs_s": costs,
        "read_costs_s": head,
        "tau": sum(steps) / len(steps) if steps else float("nan"),
        "tau_ci95_over_prompts": bootstrap_ci([r["tau"] for r in rows if r["acceptance_lengths"]]),
        "acceptance_histogram": np.bincount(steps, minlength=draft.block_size + 1)[1:].tolist() if steps else [],
        "new_tokens": spec_tok,
        "tokens_per_s": tps,
    }
    if not steps:  # the file gets null (no NaN in output JSON); tables print "-" and this reason
        summary["tau_missing"] = TAU_MISSING
    if baseline:
        rates = {k: n / s for k, (n, s) in base.items()}
        best = max(rates, key=rates.get)
        summary.update(
            {
                "baseline_method": best,
                "baseline_tokens_per_s": rates[best],
                "greedy_tokens_per_s": rates["greedy"],
                "hf_generate_tokens_per_s": rates["hf_generate"],
                "speedup": tps / rates[best],
                "speedup_vs_hf_generate": tps / rates["hf_generate"],
                "lossless": all(r["identical_to_baseline"] for r in rows)
                if effective_temperature(temperature) == 0
                else None,
            }
        )
    summary["environment"] = environment()
    write_json(out_dir / "summary.json", summary)
    return summary


__all__ = ["TAU_MISSING", "run_speculate"]
