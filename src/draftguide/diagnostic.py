"""The go/no-go readout diagnostic: does the deep (draft) readout rank gold tokens better than the shallow one?

Teacher forcing on `chat_template(messages) + reference_answer`. For every answer token t (position P + j,
P = prompt length) the gold token's probability, log-probability and 1-based rank (1 + the number of
vocabulary entries with a strictly higher logit) under

- `target`: the target's own logits at position t - 1 (one target forward per task);
- the draft, read two ways out of ONE multi-anchor draft forward per pathway (blocks are independent
  under the block mask, so both modes share it):
  - `next`: a block `[tok[t-1], MASK x (B-1)]` anchored at every answer token's predecessor (the draft's
    own block size: fewer masks would change the bidirectional block), offset k = 1 read for token t;
  - `block`: inference-time blocks anchored at P - 1 + b (B - 1), b = 0, 1, ...: the anchor is the last
    given token, as in speculative decoding, and offsets k = 1..B-1 predict the next B-1 answer tokens,
    so every answer token is covered once, at offset k = j mod (B-1) + 1;
- controls, on the same tokens and read the same way: `noise` = the draft fed Gaussian noise whose norm
  matches the target features per position and per target layer (what the layers contribute), and
  `random` = a freshly initialised draft of the same shape, seeded (what training contributes).

Summaries bootstrap over tasks (tokens of one task are correlated). The verdict compares mean per-task
(log p_draft - log p_target) in the `next` mode on tokens of tasks the target fails: see `verdict`.
This module is arithmetic only; `report.py` draws and writes.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from .draft import DFlashDraft, multi_block_hidden
from .errors import DraftGuideError
from .targets import extract_features

MODES = ("next", "block")
CONTROLS = ("noise", "random")
PATHWAYS = ("target", "draft", "ttt", *CONTROLS)  # ttt: the draft adapted on the task's context (--ttt)
BUCKETS = ((0.01, "p<0.01"), (0.1, "0.01<=p<0.1"), (0.5, "0.1<=p<0.5"), (math.inf, "p>=0.5"))
VERDICT_TOL = 1e-6  # nats: differences below this are float noise, not an effect
MAX_ANCHORS = 256  # anchors per draft forward; longer answers take a few (memory grows with anchors x context)


# -- per-token scores ---------------------------------------------------------------------------------
def gold_scores(logits: torch.Tensor, gold: torch.Tensor) -> dict[str, np.ndarray]:
    """log p, p and 1-based rank of `gold` under each row of `logits`; rank = 1 + #(logit > gold's logit),
    so ties go to the gold token.
    # logits: [N, V], gold: [N] -> arrays [N]"""
    logits = logits.float()
    g = logits.gather(-1, gold[:, None])  # [N, 1]
    logp = (g[:, 0] - torch.logsumexp(logits, -1)).cpu().numpy().astype(np.float64)
    rank = (1 + (logits > g).sum(-1)).cpu().numpy().astype(np.int64)
    return {"logp": logp, "p": np.exp(logp), "rank": rank}


def confidence_bucket(p_target: float) -> str:
    return next(name for hi, name in BUCKETS if p_target < hi)


def norm_matched_noise(features: torch.Tensor, n_layers: int, seed: int) -> torch.Tensor:
    """Standard Gaussian noise rescaled so that each position's slice of each target layer has the norm
    of the real feature there. # features: [B, T, n*d] -> same shape"""
    B, T, D = features.shape
    f = features.float().reshape(B, T, n_layers, D // n_layers)
    z = torch.randn(f.shape, generator=torch.Generator().manual_seed(seed)).to(f.device)
    z = z * (f.norm(dim=-1, keepdim=True) / z.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return z.reshape(B, T, D).to(features.dtype)


def random_like(draft: DFlashDraft, seed: int = 0) -> DFlashDraft:
    """A freshly initialised draft with `draft`'s config, dtype and device (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rnd = DFlashDraft(copy.deepcopy(draft.config))
        rnd.init_weights()
    p = next(draft.parameters())
    return rnd.to(device=p.device, dtype=p.dtype).eval().requires_grad_(False)


def block_reads(n_answer: int, block_size: int, modes: Iterable[str]) -> tuple[list[int], dict[str, tuple[list[int], list[int]]]]:
    """Which anchors one draft forward needs and, per mode, which (block, offset) to read for each answer
    token j = 0..A-1. Anchors are indices into the answer's predecessors (anchor i sits at position P-1+i).
    Returns (anchors, {mode: (block index into anchors per j, offset k per j)})."""
    step = block_size - 1
    need: set[int] = set()
    reads = {}
    for mode in modes:
        if mode == "next":
            anchors, ks = list(range(n_answer)), [1] * n_answer
        elif mode == "block":
            anchors, ks = [j - j % step for j in range(n_answer)], [j % step + 1 for j in range(n_answer)]
        else:
            raise DraftGuideError(f"unknown mode {mode!r} (expected {', '.join(MODES)})")
        need.update(anchors)
        reads[mode] = (anchors, ks)
    order = sorted(need)
    where = {a: i for i, a in enumerate(order)}
    return order, {m: ([where[a] for a in anchors], ks) for m, (anchors, ks) in reads.items()}


def draft_scores(draft, target, features, ids, n_prompt: int, modes: Iterable[str]) -> dict[str, dict]:
    """Per mode: gold scores of the draft for every answer token and the block offset k each was read at.
    # features: [1, T, n*d], ids: [1, T]"""
    A = ids.shape[1] - n_prompt
    anchors, reads = block_reads(A, draft.block_size, modes)
    hidden = []
    for c in range(0, len(anchors), MAX_ANCHORS):
        pos = torch.tensor([[n_prompt - 1 + a for a in anchors[c : c + MAX_ANCHORS]]], device=ids.device)
        hidden.append(multi_block_hidden(draft, target, features, ids, pos)[0])  # [m, B, d]
    h = torch.cat(hidden)
    gold = ids[0, n_prompt:]
    out = {}
    for mode, (blocks, ks) in reads.items():
        rows = h[torch.tensor(blocks, device=h.device), torch.tensor(ks, device=h.device)]  # [A, d]
        out[mode] = gold_scores(draft.logits(rows[None], target)[0], gold) | {"k": np.asarray(ks)}
    return out


@torch.inference_mode()
def score_sequence(target, draft, ids: torch.Tensor, n_prompt: int, modes: Iterable[str] = MODES,
                   controls: dict | None = None, noise_seed: int = 0, adapt=None) -> dict:
    """Teacher-forced scores of the answer tokens `ids[0, n_prompt:]`: one target forward, one draft forward
    per pathway. `controls` maps a control name to the draft it runs (`noise` runs with noise features).
    `adapt(prompt_features, prompt_ids)` returns a draft adapted on the prompt (a context manager that
    resets it, see `ttt.ttt_adapt`), scored as pathway `ttt`; the prompt's features come from the same
    target forward (the target is causal), so TTT costs no extra target pass.
    Returns {"target": scores, mode: {pathway: scores (+ "k")}} with arrays over answer tokens, and with
    `adapt` "ttt_report" (the adaptation's `TTTReport` as a dict).
    # ids: [1, T]"""
    modes = list(modes)
    A = ids.shape[1] - n_prompt
    if n_prompt < 1 or A < 1:
        raise DraftGuideError(f"need a prompt and an answer token, got {n_prompt} prompt and {A} answer tokens")
    out = target(ids, output_hidden_states=True, logits_to_keep=A + 1)
    res: dict = {"target": gold_scores(out.logits[0, :-1], ids[0, n_prompt:])}  # logits at t-1 predict t
    feats = extract_features(out.hidden_states, draft.target_layer_ids)
    runs = {"draft": (draft, feats)}
    for name, module in (controls or {}).items():
        if name == "noise":
            runs[name] = (module, norm_matched_noise(feats, len(draft.target_layer_ids), noise_seed))
        elif name == "random":
            runs[name] = (module, feats)
        else:
            raise DraftGuideError(f"unknown control {name!r} (expected {', '.join(CONTROLS)})")
    for mode in modes:
        res[mode] = {}
    for name, (module, f) in runs.items():
        for mode, scores in draft_scores(module, target, f, ids, n_prompt, modes).items():
            res[mode][name] = scores
    if adapt is not None:
        with adapt(feats[:, :n_prompt], ids[:, :n_prompt]) as adapted:
            for mode, scores in draft_scores(adapted, target, feats, ids, n_prompt, modes).items():
                res[mode]["ttt"] = scores
            res["ttt_report"] = adapted.report.to_dict()
    return res


# -- tasks in, token records out ----------------------------------------------------------------------
@dataclass
class TaskInput:
    task_id: str
    prompt_ids: list[int]
    answer_ids: list[int]
    answer_tokens: list[str]
    context: str  # system and user turns: what "in context" means
    category: str
    subcategory: str
    solved: bool | None = None


@dataclass
class Prepared:
    tasks: list[TaskInput]
    skipped: list[dict] = field(default_factory=list)  # {task_id, reason}


def task_id(task: dict, default=None) -> str:
    """A task's id: `metadata.task_id` (CL-bench rows), else `id`, else `default`."""
    return str((task.get("metadata") or {}).get("task_id", task.get("id", default)))


def context_text(task: dict) -> str:
    """The text a task gives the model to learn from: its system and user turns."""
    return "\n".join(m["content"] for m in task.get("messages", []) if m.get("role") in ("system", "user"))


def prepare_tasks(tasks: list[dict], tokenizer, references: dict[str, str] | None = None,
                  solved: dict[str, bool] | None = None) -> Prepared:
    """Token ids of prompt and reference answer per task. `references` (task_id -> text, e.g. another run's
    responses) replaces `reference_answer`; a task with no usable reference is skipped and counted."""
    from .prompts import encode_prompt

    out = Prepared([])
    for t in tasks:
        meta = t.get("metadata") or {}
        tid = task_id(t, default=len(out.tasks) + len(out.skipped))
        ref = references.get(tid) if references is not None else t.get("reference_answer")
        if not isinstance(ref, str) or not ref.strip():
            out.skipped.append({"task_id": tid, "reason": "no reference answer"})
            continue
        answer = tokenizer(ref, add_special_tokens=False)["input_ids"]
        if not answer:
            out.skipped.append({"task_id": tid, "reason": "reference answer has no tokens"})
            continue
        context = context_text(t)
        out.tasks.append(TaskInput(
            task_id=tid, prompt_ids=encode_prompt(tokenizer, t)[0].tolist(), answer_ids=list(answer),
            answer_tokens=[tokenizer.decode([a]) for a in answer], context=context,
            category=meta.get("context_category") or "(none)", subcategory=meta.get("sub_category") or "(none)",
            solved=(solved or {}).get(tid),
        ))
    return out


def in_context(token: str, context: str) -> bool:
    """Whether the token's text (stripped, unless it is only whitespace) occurs in the context."""
    key = token.strip() or token
    return bool(key) and key in context


def diagnose(target, draft, prepared: Prepared, *, modes: Iterable[str] = MODES, controls: Iterable[str] = CONTROLS,
             random_draft=None, seed: int = 0, progress: bool = False, ttt=None) -> list[dict]:
    """Score every prepared task. Returns one record per (task, answer token) holding the target's scores,
    per mode each pathway's scores and the offset k, and the tags. `ttt` (a `ttt.TTTConfig`) adds pathway
    `ttt`: the draft adapted on each task's prompt (system and user turns), seeded per task id and reset
    before the next task, so no task's numbers depend on which tasks ran before it; the record then holds
    its task's `ttt_report`. Controls always run the base draft."""
    from tqdm.auto import tqdm

    from .prompts import check_length

    for t in prepared.tasks:  # teacher forcing reads prompt + answer in one forward: it must fit, before any work
        check_length(target, len(t.prompt_ids) + len(t.answer_ids), where=f"task {t.task_id!r}",
                     what="prompt with its reference answer")
    modes, controls = list(modes), list(controls)
    ctl = {}
    if "noise" in controls:
        ctl["noise"] = draft
    if "random" in controls:
        ctl["random"] = random_draft if random_draft is not None else random_like(draft, seed)
    dev = next(target.parameters()).device
    records = []
    for ti, task in enumerate(tqdm(prepared.tasks, desc="diagnose", disable=not progress)):
        ids = torch.tensor([task.prompt_ids + task.answer_ids], device=dev)
        noise_seed = zlib.crc32(f"{seed}:{task.task_id}".encode())
        res = score_sequence(target, draft, ids, len(task.prompt_ids), modes, ctl, noise_seed, _adapter(draft, target, ttt, task))
        for j, (tok, text) in enumerate(zip(task.answer_ids, task.answer_tokens)):
            tgt = {k: _item(v[j]) for k, v in res["target"].items()}
            rec = {
                "task": ti, "task_id": task.task_id, "token_index": j, "position": len(task.prompt_ids) + j,
                "token_id": int(tok), "token": text, "target": tgt,
                "in_context": in_context(text, task.context), "first": j == 0,
                "bucket": confidence_bucket(tgt["p"]), "category": task.category, "subcategory": task.subcategory,
                "solved": task.solved,
            }
            if "ttt_report" in res:
                rec["ttt_report"] = res["ttt_report"]
            for mode in modes:
                rec[mode] = {name: {k: _item(v[j]) for k, v in s.items()} for name, s in res[mode].items()}
            records.append(rec)
    return records


def _adapter(draft, target, ttt, task: TaskInput):
    """`score_sequence`'s `adapt` for one task, or None without TTT."""
    if ttt is None:
        return None
    from .ttt import ttt_adapt

    task_seed = zlib.crc32(f"{ttt.seed}:{task.task_id}".encode())
    return lambda feats, ctx: ttt_adapt(draft, target, ctx, features=feats, **ttt.kwargs(seed=task_seed))


def _item(x):
    return int(x) if isinstance(x, (np.integer, int)) else float(x)


def token_rows(records: list[dict], modes: Iterable[str]) -> Iterable[dict]:
    """Flat rows for `tokens.jsonl`: one per (task, token, pathway); pathways `target` and `<name>_<mode>`."""
    tags = ("task_id", "token_index", "position", "token_id", "token", "in_context", "first", "bucket",
            "category", "subcategory", "solved")
    for r in records:
        base = {k: r[k] for k in tags}
        yield base | {"pathway": "target", "mode": None, "offset": None} | r["target"]
        for mode in modes:
            for name, s in r[mode].items():
                yield base | {"pathway": f"{name}_{mode}", "mode": mode, "offset": s["k"]} | {
                    k: v for k, v in s.items() if k != "k"}


# -- summaries ----------------------------------------------------------------------------------------
class TaskBootstrap:
    """Percentile bootstrap that resamples tasks, keeping each task's tokens together. `tasks` is the task
    index of every token; statistics are token-weighted over the resampled tasks."""

    def __init__(self, tasks: np.ndarray, n_boot: int = 1000, seed: int = 0):
        uniq, self.inv = np.unique(tasks, return_inverse=True)
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, len(uniq), size=(n_boot, len(uniq)))
        counts = np.zeros((n_boot, len(uniq)))
        np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1)
        self.w = counts[:, self.inv]  # [n_boot, n_tokens]: how often each token's task was drawn

    def mean(self, x: np.ndarray) -> dict:
        x = np.asarray(x, dtype=float)
        boot = (self.w @ x) / self.w.sum(1)
        return {"mean": float(x.mean()), "ci95": _ci(boot)}

    def median(self, x: np.ndarray) -> dict:
        """Weighted median per resample: the mean of the lower and upper median, as `np.median`."""
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="stable")
        xs, cum = x[order], self.w[:, order].cumsum(1)
        half = cum[:, -1:] / 2
        lo = xs[(cum < half).sum(1)]
        hi = xs[np.minimum((cum <= half).sum(1), len(xs) - 1)]
        return {"median": float(np.median(x)), "ci95": _ci((lo + hi) / 2)}


def _ci(boot: np.ndarray) -> list[float]:
    return [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]


def _columns(records: list[dict], mode: str) -> dict[str, np.ndarray]:
    cols = {"task": np.array([r["task"] for r in records])}
    for k in ("logp", "p", "rank"):
        cols[f"target_{k}"] = np.array([r["target"][k] for r in records], dtype=float)
    for name in records[0][mode]:
        for k in ("logp", "p", "rank", "k"):
            cols[f"{name}_{k}"] = np.array([r[mode][name][k] for r in records], dtype=float)
    return cols


def group_stats(cols: dict[str, np.ndarray], sel: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean log p and median rank per pathway, and per draft-side pathway its mean log-p difference from the
    target and its rank win / tie / loss rates against the target (win = strictly lower rank), all with
    95% CIs over tasks; p win rate as a secondary number."""
    names = [n for n in PATHWAYS if f"{n}_logp" in cols]
    bs = TaskBootstrap(cols["task"][sel], n_boot, seed)
    out: dict = {"n_tokens": int(sel.sum()), "n_tasks": int(len(np.unique(cols["task"][sel])))}
    out["mean_logp"] = {n: bs.mean(cols[f"{n}_logp"][sel]) for n in names}
    out["median_rank"] = {n: bs.median(cols[f"{n}_rank"][sel]) for n in names}
    t_logp, t_rank, t_p = cols["target_logp"][sel], cols["target_rank"][sel], cols["target_p"][sel]
    for n in names[1:]:
        out.setdefault("logp_minus_target", {})[n] = bs.mean(cols[f"{n}_logp"][sel] - t_logp)
        r = cols[f"{n}_rank"][sel]
        out.setdefault("rank_vs_target", {})[n] = {
            "win": bs.mean(r < t_rank), "tie": bs.mean(r == t_rank), "loss": bs.mean(r > t_rank)}
        out.setdefault("p_win_rate", {})[n] = bs.mean(cols[f"{n}_p"][sel] > t_p)
    return out


def groups(records: list[dict], mode: str) -> dict[str, np.ndarray]:
    """Token selections: all, by confidence bucket, solved status, in context, first token, category,
    subcategory and (block mode) offset."""
    def sel(fn):
        return np.array([fn(r) for r in records], dtype=bool)

    g = {"all": np.ones(len(records), dtype=bool)}
    for _, b in BUCKETS:
        g[f"bucket:{b}"] = sel(lambda r, b=b: r["bucket"] == b)
    for name, val in (("failed", False), ("solved", True), ("unknown", None)):
        g[f"task:{name}"] = sel(lambda r, v=val: r["solved"] is v)
    g["in_context:yes"], g["in_context:no"] = sel(lambda r: r["in_context"]), sel(lambda r: not r["in_context"])
    g["first:yes"], g["first:no"] = sel(lambda r: r["first"]), sel(lambda r: not r["first"])
    for key, tag in (("category", "category"), ("subcategory", "subcategory")):
        for v in sorted({r[tag] for r in records}):
            g[f"{key}:{v}"] = sel(lambda r, v=v, tag=tag: r[tag] == v)
    if mode == "block":
        for k in sorted({r[mode]["draft"]["k"] for r in records}):
            g[f"offset:{k}"] = sel(lambda r, k=k: r[mode]["draft"]["k"] == k)
    return {k: v for k, v in g.items() if v.any()}


def per_task_mean(records: list[dict], fn) -> list[float]:
    """fn(record) averaged over each task's tokens, one value per task (tasks in first-seen order)."""
    per_task: dict[int, list[float]] = {}
    for r in records:
        per_task.setdefault(r["task"], []).append(fn(r))
    return [float(np.mean(v)) for v in per_task.values()]


def ttt_gain(records: list[dict], mode: str, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean per-task (log p_ttt - log p_draft): what adapting the draft on the task's context changed, with a
    bootstrap 95% CI over tasks."""
    from .runs import bootstrap_ci

    diffs = per_task_mean(records, lambda r: r[mode]["ttt"]["logp"] - r[mode]["draft"]["logp"])
    return {"mean_per_task_logp_gain": float(np.mean(diffs)), "ci95": list(bootstrap_ci(diffs, n_boot=n_boot, seed=seed)),
            "n_tasks": len(diffs)}


def verdict(records: list[dict], mode: str = "next", n_boot: int = 2000, seed: int = 0, pathway: str = "draft") -> dict:
    """The rule: per task, the mean over its answer tokens of (log p_draft - log p_target), in `mode`, over
    the tasks the target fails (all tasks when solve status is unknown or none fails). Bootstrap 95% CI
    of the mean over tasks: entirely above +VERDICT_TOL -> draft_better, entirely below -VERDICT_TOL ->
    draft_worse, else draft_equal (also with fewer than two tasks, where the CI means nothing)."""
    from .runs import bootstrap_ci

    failed = [r for r in records if r["solved"] is False]
    if failed:
        basis, use = "tasks the target fails", failed
    elif any(r["solved"] is True for r in records):
        basis, use = "all tasks (the target fails none)", records
    else:
        basis, use = "all tasks (solve status unknown)", records
    diffs = per_task_mean(use, lambda r: r[mode][pathway]["logp"] - r["target"]["logp"])
    lo, hi = bootstrap_ci(diffs, n_boot=n_boot, seed=seed)
    call = "draft_equal" if len(diffs) < 2 else "draft_better" if lo > VERDICT_TOL else "draft_worse" if hi < -VERDICT_TOL else "draft_equal"
    return {"verdict": call, "pathway": pathway, "mode": mode, "basis": basis, "n_tasks": len(diffs), "n_tokens": len(use),
            "mean_per_task_logp_diff": float(np.mean(diffs)), "ci95": [lo, hi],
            "rule": f"95% bootstrap CI (over tasks) of the mean per-task (log p_{pathway} - log p_target), {mode} mode, "
                    f"on {basis}: lower end > {VERDICT_TOL:g} -> draft_better, upper end < -{VERDICT_TOL:g} -> "
                    "draft_worse, else (and with fewer than 2 tasks) draft_equal"}


def summarize(records: list[dict], modes: Iterable[str], n_boot: int = 1000, seed: int = 0) -> dict:
    """`summary.json` numbers: counts, per mode and group the statistics of `group_stats`, and the verdict."""
    modes = list(modes)
    if not records:
        raise DraftGuideError("no answer tokens to summarise (every task was skipped)")
    out = {"n_tasks": len({r["task"] for r in records}), "n_tokens": len(records), "modes": {}}
    for mode in modes:
        cols = _columns(records, mode)
        out["modes"][mode] = {name: group_stats(cols, s, n_boot, seed) for name, s in groups(records, mode).items()}
    vmode = "next" if "next" in modes else modes[0]
    out["verdict"] = verdict(records, vmode, seed=seed)
    if "ttt" in records[0][modes[0]]:
        out["ttt"] = {"verdict": verdict(records, vmode, seed=seed, pathway="ttt"),
                      "gain_over_base": {m: ttt_gain(records, m, seed=seed) for m in modes}}
    return out


__all__ = [
    "BUCKETS", "CONTROLS", "MODES", "PATHWAYS", "Prepared", "TaskBootstrap", "TaskInput", "block_reads",
    "confidence_bucket", "diagnose", "draft_scores", "gold_scores", "group_stats", "in_context",
    "norm_matched_noise", "per_task_mean", "prepare_tasks", "random_like", "score_sequence", "summarize", "token_rows",
    "ttt_gain", "verdict",
]
