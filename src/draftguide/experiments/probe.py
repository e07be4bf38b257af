"""Linear probes of the readouts: does a representation at the answer position tell the reference answer from
the distractor answer? (research plan 3.4)

Per task (a suite row with `reference_answer` and `distractor_answer`): the prompt (chat template with the
generation prompt) is followed by the longest common token prefix of the two answers; the *answer position*
`a` is the last token of that, where the model must choose between their first differing tokens `r` (the
reference's) and `s` (the distractor's). Tasks whose answers never differ in a token (one a token prefix of
the other) are skipped. Representations at `a`:

- `target_last`: the target's last hidden state (after the final norm): what the target's `lm_head` reads;
- `draft`: the draft's final hidden state at block offset k = 1 of the block anchored at `a` (what the draft
  feeds `lm_head` for the same token; the aligned readout sees features `<= a`, a speculative draft `< a`);
- `layer_<l>`: the output of each target layer `l` the draft reads (its `target_layer_ids`).

A representation alone cannot say which of two *given* answers is right, so the probe reads it against the
candidates: per task two examples, `x = h * (u_r - u_s)` with label 1 and `-x` with label 0 (u = rows of the
target's `lm_head`, `*` elementwise). A probe with all weights 1 is the logit difference `logit_r - logit_s`
(the readout's own choice, reported beside as `zero_shot`); a fitted probe may reweight every dimension: a
diagonal bilinear probe, linear in `x`. Logistic regression (scikit-learn; features standardised, no
intercept, L2), cross-validated with folds grouped by `metadata.context_id`, so no context is in the training
and the test fold at once. Accuracy over out-of-fold predictions per task, with a 95% bootstrap CI over
contexts; the shuffled-label control runs the same cross-validation with each context's labels flipped by a
fair coin (the label then says nothing about the representation: ~50%).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from draftguide.errors import DraftGuideError

DEFAULT_FOLDS = 5


# -- the probe (any features) -----------------------------------------------------------------------
def _sklearn():
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import GroupKFold
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as e:  # pragma: no cover - a dependency
        raise DraftGuideError("probes need scikit-learn: pip install scikit-learn") from e
    return LogisticRegression, GroupKFold, make_pipeline, StandardScaler


def cv_predictions(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    folds: int = DEFAULT_FOLDS,
    C: float = 1.0,
    intercept: bool = False,
) -> np.ndarray:
    """Out-of-fold P(y = 1) per example, folds grouped by `groups` (a group is never split across folds).
    # X: [n, d], y: [n] in {0, 1}, groups: [n] -> [n]"""
    LogisticRegression, GroupKFold, make_pipeline, StandardScaler = _sklearn()
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise DraftGuideError(f"cross-validation needs at least 2 contexts, got {n_groups}")
    prob = np.full(len(y), np.nan)
    for tr, te in GroupKFold(n_splits=min(folds, n_groups)).split(X, y, groups):
        if len(np.unique(y[tr])) < 2:  # a fold with one class only: predict it
            prob[te] = float(y[tr][0])
            continue
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, fit_intercept=intercept, max_iter=5000))
        clf.fit(X[tr], y[tr])
        prob[te] = clf.predict_proba(X[te])[:, 1]
    return prob


def group_bootstrap(values: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile-bootstrap CI of the mean of `values`, resampling groups (contexts)."""
    uniq, inv = np.unique(groups, return_inverse=True)
    sums, counts = np.bincount(inv, weights=values, minlength=len(uniq)), np.bincount(inv, minlength=len(uniq))
    idx = np.random.default_rng(seed).integers(0, len(uniq), size=(n_boot, len(uniq)))
    boot = sums[idx].sum(1) / np.maximum(counts[idx].sum(1), 1)
    return [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]


def shuffle_labels(y: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each group's labels flipped by one fair coin: labels independent of the features, group structure kept."""
    uniq, inv = np.unique(groups, return_inverse=True)
    flip = rng.integers(0, 2, size=len(uniq))[inv]
    return np.where(flip == 1, 1 - y, y)


def probe_accuracy(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    *,
    folds: int = DEFAULT_FOLDS,
    n_boot: int = 1000,
    shuffles: int = 5,
    seed: int = 0,
    C: float = 1.0,
    intercept: bool = False,
) -> dict:
    """Cross-validated probe accuracy with a bootstrap CI over groups, and the same for the shuffled-label
    control (mean over `shuffles` label shufflings)."""
    X, y, groups = np.asarray(X, dtype=np.float64), np.asarray(y).astype(int), np.asarray(groups)
    correct = ((cv_predictions(X, y, groups, folds, C, intercept) > 0.5) == (y == 1)).astype(float)
    out = {
        "accuracy": float(correct.mean()),
        "ci95": group_bootstrap(correct, groups, n_boot, seed),
        "correct": correct,  # [n] per example (for paired comparisons; `analyse` keeps it out of the JSON)
        "n_examples": int(len(y)),
        "n_groups": int(len(np.unique(groups))),
        "folds": int(min(folds, len(np.unique(groups)))),
    }
    if shuffles:
        rng = np.random.default_rng(seed + 1)
        runs = []
        for _ in range(shuffles):
            ys = shuffle_labels(y, groups, rng)
            runs.append(((cv_predictions(X, ys, groups, folds, C, intercept) > 0.5) == (ys == 1)).astype(float))
        pooled = np.mean(runs, 0)
        out["shuffled"] = {
            "accuracy": float(pooled.mean()),
            "ci95": group_bootstrap(pooled, groups, n_boot, seed),
            "per_shuffle": [float(r.mean()) for r in runs],
            "n_shuffles": shuffles,
        }
    return out


# -- representations at the answer position --------------------------------------------------------
def answer_split(ref_ids: list[int], dis_ids: list[int]) -> int | None:
    """Length of the common token prefix of the two answers, or None when one is a prefix of the other (they
    never differ in a token)."""
    n = 0
    while n < min(len(ref_ids), len(dis_ids)) and ref_ids[n] == dis_ids[n]:
        n += 1
    return None if n == min(len(ref_ids), len(dis_ids)) else n


@torch.inference_mode()
def task_representations(target, tokenizer, draft, task: dict) -> dict | None:
    """The representations at the answer position of one task and the two candidate tokens, or None (skipped)."""
    from draftguide.modeling.draft import multi_block_hidden
    from draftguide.modeling.prompts import encode_prompt
    from draftguide.modeling.targets import extract_features

    ref, dis = task.get("reference_answer"), task.get("distractor_answer")
    if ref is None or dis is None or str(ref) == str(dis):
        return None
    r_ids = tokenizer.encode(str(ref), add_special_tokens=False)
    d_ids = tokenizer.encode(str(dis), add_special_tokens=False)
    common = answer_split(r_ids, d_ids)
    if common is None:
        return None
    dev = next(target.parameters()).device
    prompt = encode_prompt(tokenizer, task).to(dev)
    ids = torch.cat([prompt, torch.tensor([r_ids[:common]], dtype=prompt.dtype, device=dev)], 1)  # [1, T]
    a = ids.shape[1] - 1
    out = target(ids, output_hidden_states=True, logits_to_keep=1)
    reps = {"target_last": out.hidden_states[-1][0, a]}
    for layer in draft.target_layer_ids:
        reps[f"layer_{layer}"] = out.hidden_states[layer + 1][0, a]
    feats = extract_features(out.hidden_states, draft.target_layer_ids).to(next(draft.parameters()).dtype)
    h = multi_block_hidden(draft, target, feats, ids, torch.tensor([[a]], device=dev), rows=slice(1, 2))[0, 0, 0]  # [d]
    reps["draft"] = h
    r_tok, s_tok = r_ids[common], d_ids[common]
    t_logits = out.logits[0, -1].float()
    d_logits = draft.logits(h[None, None], target)[0, 0].float()
    return {
        "reps": {k: v.float().cpu() for k, v in reps.items()},
        "answer_pos": a,
        "prompt_len": prompt.shape[1],
        "common_prefix": common,
        "tokens": [r_tok, s_tok],
        "zero_shot": {
            "target_last": float(t_logits[r_tok] - t_logits[s_tok]),
            "draft": float(d_logits[r_tok] - d_logits[s_tok]),
        },
    }


def pair_features(h: torch.Tensor, head: torch.Tensor, r_tok: int, s_tok: int) -> np.ndarray:
    """x = h * (u_r - u_s): with all weights 1 the probe is the logit difference. # h: [d], head: [V, d] -> [d]"""
    return (h * (head[r_tok] - head[s_tok])).numpy().astype(np.float32)


def collect(target, tokenizer, draft, tasks: list[dict], progress: bool = True) -> dict:
    """Per representation the paired examples: {"X": {rep: [2n, d]}, "y": [2n], "groups": [2n], "rows": [n task
    rows], "skipped": [task ids]}; example 2i is (task i, label 1), 2i+1 its mirror (label 0)."""
    from tqdm.auto import tqdm

    head = (getattr(target, "lm_head", None) or target.get_output_embeddings()).weight.detach().float().cpu()
    X: dict[str, list] = {}
    y, groups, rows, skipped = [], [], [], []
    for task in tqdm(tasks, desc="probe", disable=not progress):
        m = task["metadata"]
        got = task_representations(target, tokenizer, draft, task)
        if got is None:
            skipped.append(m["task_id"])
            continue
        for name, h in got["reps"].items():
            x = pair_features(h, head, *got["tokens"])
            X.setdefault(name, []).extend([x, -x])
        ctx = m.get("context_id") or m["task_id"]
        y += [1, 0]
        groups += [ctx, ctx]
        rows.append(
            {
                "task_id": m["task_id"],
                "context_id": ctx,
                "context_category": m.get("context_category"),
                "sub_category": m.get("sub_category"),
                "reference_answer": task["reference_answer"],
                "distractor_answer": task["distractor_answer"],
                "answer_pos": got["answer_pos"],
                "prompt_len": got["prompt_len"],
                "common_prefix": got["common_prefix"],
                "tokens": got["tokens"],
                "tokens_text": [tokenizer.decode([t]) for t in got["tokens"]],
                "zero_shot_logit_diff": got["zero_shot"],
            }
        )
    return {
        "X": {k: np.stack(v) for k, v in X.items()},
        "y": np.array(y),
        "groups": np.array(groups),
        "rows": rows,
        "skipped": skipped,
    }


def zero_shot(X: np.ndarray, y: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """Accuracy of the unfitted probe (all weights 1: the sign of the logit difference; for an inner layer the
    logit lens without the final norm), with its bootstrap CI."""
    correct = ((X.sum(1) > 0) == (y == 1)).astype(float)
    return {
        "accuracy": float(correct.mean()),
        "ci95": group_bootstrap(correct, groups, n_boot, seed),
        "correct": correct,
    }


def paired_vs(correct: np.ndarray, ref: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """Accuracy difference (this representation - the reference) on the same examples, 95% CI over contexts."""
    d = correct - ref
    return {"diff": float(d.mean()), "ci95": group_bootstrap(d, groups, n_boot, seed)}


REFERENCE = "target_last"  # the shallow readout's input: what lm_head reads


def analyse(
    data: dict, *, folds: int = DEFAULT_FOLDS, n_boot: int = 1000, shuffles: int = 5, seed: int = 0, C: float = 1.0
) -> dict:
    """Probe accuracy (with CI and shuffled control) and zero-shot accuracy per representation."""
    y, g = data["y"], data["groups"]
    if len(np.unique(g)) < 2:
        raise DraftGuideError(
            f"probes need at least 2 usable tasks (contexts), got {len(np.unique(g))} "
            f"({len(data['skipped'])} skipped: answers that never differ in a token)"
        )
    reps, correct = {}, {}
    for name, X in data["X"].items():
        reps[name] = probe_accuracy(X, y, g, folds=folds, n_boot=n_boot, shuffles=shuffles, seed=seed, C=C)
        reps[name]["zero_shot"] = zero_shot(X, y, g, n_boot, seed)
        reps[name]["dim"] = int(X.shape[1])
        correct[name] = (reps[name].pop("correct"), reps[name]["zero_shot"].pop("correct"))
    if REFERENCE in correct:  # what each representation adds over what lm_head reads, on the same tasks
        for name, (probe_c, zero_c) in correct.items():
            if name != REFERENCE:
                reps[name]["vs_target_last"] = paired_vs(probe_c, correct[REFERENCE][0], g, n_boot, seed)
                reps[name]["zero_shot"]["vs_target_last"] = paired_vs(zero_c, correct[REFERENCE][1], g, n_boot, seed)
    return {
        "representations": reps,
        "n_tasks": len(data["rows"]),
        "n_skipped": len(data["skipped"]),
        "skipped": data["skipped"][:50],
        "folds": folds,
        "shuffles": shuffles,
        "C": C,
    }


# -- the run folder ---------------------------------------------------------------------------------
def order(names) -> list[str]:
    """target_last, the target layers by depth, draft."""
    layers = sorted((n for n in names if n.startswith("layer_")), key=lambda n: int(n.split("_")[1]))
    return [n for n in ("target_last",) if n in names] + layers + [n for n in ("draft",) if n in names]


def probe_markdown(s: dict) -> str:
    cmd = s.get("command") or "(library call)"
    lines = [
        "# Linear probes at the answer position: reference vs distractor",
        "",
        f"Command: `{cmd}`",
        "",
        f"{s['n_tasks']} tasks ({s['n_skipped']} skipped: answers that never differ in a token); {s['folds']}-fold "
        "cross-validation grouped by context; logistic regression on x = h * (u_ref - u_distractor) (standardised, "
        f"no intercept, C = {s['C']:g}); shuffled control: labels flipped per context by a fair coin, mean of "
        f"{s['shuffles']} shufflings; zero-shot: the unfitted probe (the sign of the logit difference). "
        "[95% bootstrap CI over contexts.]",
        "",
        "| representation | dim | probe accuracy | shuffled labels | probe - target_last (paired) | zero-shot "
        "(logit difference) | zero-shot - target_last (paired) |",
        "|---|---|---|---|---|---|---|",
    ]
    f = lambda r: f"{r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"  # noqa: E731
    ref = "(reference)"
    d = lambda r: f"{r['diff']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]" if r else "-"  # noqa: E731
    for name in order(s["representations"]):
        r = s["representations"][name]
        lines.append(
            f"| {name} | {r['dim']} | {f(r)} | {f(r['shuffled']) if 'shuffled' in r else '-'} | "
            f"{ref if name == REFERENCE else d(r.get('vs_target_last'))} | {f(r['zero_shot'])} | "
            f"{ref if name == REFERENCE else d(r['zero_shot'].get('vs_target_last'))} |"
        )
    return "\n".join(lines + ["", "![probe](probe.png)", ""])


def run_probe(
    target,
    tokenizer,
    draft,
    tasks: list[dict],
    out_dir: str | Path,
    *,
    folds: int = DEFAULT_FOLDS,
    n_boot: int = 1000,
    shuffles: int = 5,
    seed: int = 0,
    C: float = 1.0,
    command: str | None = None,
    settings: dict | None = None,
    progress: bool = True,
) -> dict:
    """Collect, probe, and write `examples.jsonl`, `features.npz`, `summary.json`, `report.md` and `probe.png`."""
    from draftguide.reporting.runs import JsonlWriter, environment, write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = collect(target, tokenizer, draft, tasks, progress)
    with JsonlWriter(out_dir / "examples.jsonl", mode="w") as w:
        for r in data["rows"]:
            w.write(r)
    np.savez_compressed(
        out_dir / "features.npz", y=data["y"], groups=data["groups"], **{f"X_{k}": v for k, v in data["X"].items()}
    )
    s = analyse(data, folds=folds, n_boot=n_boot, shuffles=shuffles, seed=seed, C=C)
    s |= {
        "kind": "probe",
        "target_layer_ids": list(draft.target_layer_ids),
        "context_includes_anchor": bool(draft.context_includes_anchor),
        "command": command,
        "settings": settings or {},
        "environment": environment(),
    }
    write_json(out_dir / "summary.json", s)
    from draftguide.reporting.plots import probe_figure

    probe_figure(s, out_dir / "probe.png")
    (out_dir / "report.md").write_text(probe_markdown(s))
    return s


__all__ = [
    "analyse",
    "answer_split",
    "collect",
    "cv_predictions",
    "group_bootstrap",
    "pair_features",
    "probe_accuracy",
    "run_probe",
    "shuffle_labels",
    "task_representations",
]
