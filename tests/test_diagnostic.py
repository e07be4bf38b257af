"""The readout diagnostic: exact ranks, a draft that copies the target reads as equal, both draft modes equal
the inference path they stand for, skipped rows are counted, controls and bootstrap do what they say, and
the CLI writes its run folder."""

import json

import numpy as np
import pytest
import torch
from conftest import char_tokenizer, tiny_draft, tiny_target

from draftguide.cli import main
from draftguide.diagnostic import (
    TaskBootstrap,
    diagnose,
    gold_scores,
    norm_matched_noise,
    prepare_tasks,
    random_like,
    score_sequence,
    summarize,
)
from draftguide.draft import DraftCache
from draftguide.speculative import speculative_generate
from draftguide.targets import extract_features


def _task(tid, answer=None, cat="A", sub="a", context="The code word is tulip.", question="Code word?"):
    row = {"messages": [{"role": "system", "content": context}, {"role": "user", "content": question}],
           "rubrics": ["r"], "checks": [{"type": "regex", "value": "."}],
           "metadata": {"task_id": tid, "context_id": f"c-{tid}", "context_category": cat, "sub_category": sub}}
    if answer is not None:
        row["reference_answer"] = answer
    return row


TASKS = [_task("t0", "tulip"), _task("t1", "12 apples and 3 pears", "B", "b"), _task("t2", "xyz", "B", "c"),
         _task("t3", "Lyon, not Paris", "A", "a")]


class CopyTargetDraft(torch.nn.Module):
    """A stub with the draft's interface whose logits are the target's: its only feature is the target's last
    layer (final norm applied), and the block query at position p returns that feature at p - 1."""

    def __init__(self, target, block_size=4, mask_token_id=3):
        super().__init__()
        self.target_layer_ids = [target.config.num_hidden_layers - 1]
        self.block_size, self.mask_token_id = block_size, mask_token_id
        self.d = target.config.hidden_size
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def embed(self, target, ids):
        return torch.zeros(*ids.shape, self.d)

    def forward(self, noise_embedding, target_hidden, position_ids, cache=None, attention_mask=None):
        q = noise_embedding.shape[1]
        pos = (position_ids[0, -q:] - 1).clamp(max=target_hidden.shape[1] - 1)
        return target_hidden[:, pos]

    def logits(self, hidden, target):
        return target.lm_head(hidden)


@pytest.fixture(scope="module")
def pair():
    t = tiny_target()
    return t, tiny_draft(t, mask_token_id=3), char_tokenizer()


# -- arithmetic ---------------------------------------------------------------------------------------
def test_ranks_are_one_based_and_match_a_brute_force_sort():
    logits = torch.randn(50, 97, generator=torch.Generator().manual_seed(0))
    gold = torch.randint(0, 97, (50,), generator=torch.Generator().manual_seed(1))
    gold[0] = logits[0].argmax()  # a top-1 token has rank 1
    s = gold_scores(logits, gold)
    brute = [1 + sorted(range(97), key=lambda v: -float(logits[i, v])).index(int(gold[i])) for i in range(50)]
    assert s["rank"].tolist() == brute and s["rank"][0] == 1 and s["rank"].min() >= 1
    np.testing.assert_allclose(s["logp"], torch.log_softmax(logits, -1)[torch.arange(50), gold].numpy(), atol=1e-6)
    np.testing.assert_allclose(s["p"], np.exp(s["logp"]))


def test_task_bootstrap_equals_explicit_task_resampling():
    rng = np.random.default_rng(0)
    tasks = np.repeat(np.arange(7), rng.integers(1, 6, 7))
    x = rng.normal(size=tasks.size).round(1)  # ties too
    bs = TaskBootstrap(tasks, n_boot=50, seed=3)
    m, med = bs.mean(x), bs.median(x)
    assert m["mean"] == pytest.approx(x.mean()) and med["median"] == pytest.approx(np.median(x))
    for b in range(50):  # each resample: every token of a drawn task, as many times as the task was drawn
        pooled = np.repeat(x, bs.w[b].astype(int))
        assert (bs.w[b] @ x) / bs.w[b].sum() == pytest.approx(pooled.mean())
        # the median of the b-th resample, recomputed by hand, lies inside the bootstrap distribution's range
        order = np.argsort(x, kind="stable")
        cum = bs.w[b, order].cumsum()
        half = cum[-1] / 2
        assert (x[order][(cum < half).sum()] + x[order][min((cum <= half).sum(), x.size - 1)]) / 2 == pytest.approx(np.median(pooled))
    assert m["ci95"][0] <= m["mean"] <= m["ci95"][1]


def test_noise_matches_norm_per_position_and_layer_and_random_draft_is_seeded(pair):
    target, draft, _ = pair
    f = torch.randn(1, 9, 3 * 64) * torch.arange(1, 10.0)[None, :, None]
    z = norm_matched_noise(f, 3, seed=5)
    torch.testing.assert_close(z.view(1, 9, 3, 64).norm(dim=-1), f.view(1, 9, 3, 64).norm(dim=-1))
    assert not torch.allclose(z, f) and torch.equal(z, norm_matched_noise(f, 3, seed=5))
    state = torch.random.get_rng_state()
    r1, r2 = random_like(draft, seed=7), random_like(draft, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert r1.state_dict().keys() == draft.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(r1.state_dict().values(), r2.state_dict().values()))
    assert not torch.equal(r1.fc.weight, draft.fc.weight)


# -- the readout paths --------------------------------------------------------------------------------
def test_draft_copying_the_target_gives_identical_numbers_and_draft_equal(pair):
    target, _, tok = pair
    stub = CopyTargetDraft(target)
    prepared = prepare_tasks(TASKS, tok, solved={"t0": False, "t1": False, "t2": True, "t3": False})
    records = diagnose(target, stub, prepared, controls=("noise",))
    assert len(records) == sum(len(t.answer_ids) for t in prepared.tasks)
    for r in records:
        for mode in ("next", "block"):
            d = r[mode]["draft"]
            assert d["rank"] == r["target"]["rank"]
            assert d["logp"] == pytest.approx(r["target"]["logp"], abs=1e-5)
    s = summarize(records, ["next", "block"], n_boot=200)
    assert s["verdict"]["verdict"] == "draft_equal" and s["verdict"]["basis"] == "tasks the target fails"
    assert s["verdict"]["n_tasks"] == 3
    win = s["modes"]["next"]["all"]["rank_vs_target"]["draft"]
    assert win["win"]["mean"] == 0 and win["tie"]["mean"] == 1
    # the controls are not the target: the noise-fed copy differs
    assert s["modes"]["next"]["all"]["rank_vs_target"]["noise"]["tie"]["mean"] < 0.5


def test_verdict_follows_the_sign_of_a_clear_effect(pair):
    target, _, tok = pair
    prepared = prepare_tasks(TASKS, tok, solved={"t0": False, "t1": False, "t2": False, "t3": False})
    records = diagnose(target, CopyTargetDraft(target), prepared, controls=())
    for r in records:  # shift the draft's log p by a known amount
        r["next"]["draft"]["logp"] += 0.5
    assert summarize(records, ["next"], n_boot=200)["verdict"]["verdict"] == "draft_better"
    for r in records:
        r["next"]["draft"]["logp"] -= 1.0
    assert summarize(records, ["next"], n_boot=200)["verdict"]["verdict"] == "draft_worse"


def _inference_block(draft, target, feats, ids, anchor):
    """One block through the cached inference path: context < anchor (in two chunks), then [tok, MASK...]."""
    B, cache = draft.block_size, DraftCache(len(draft.layers))
    half = anchor // 2
    draft(draft.embed(target, ids[:, :1]), feats[:, :half], torch.arange(half + 1)[None], cache=cache)
    block = torch.full((1, B), draft.mask_token_id)
    block[0, 0] = ids[0, anchor]
    h = draft(draft.embed(target, block), feats[:, half:anchor], torch.arange(half, anchor + B)[None], cache=cache)
    return draft.logits(h, target)[0]  # [B, V]


def test_next_mode_equals_one_anchor_at_a_time_inference(pair):
    target, draft, _ = pair
    ids = torch.randint(4, 90, (1, 30), generator=torch.Generator().manual_seed(2))
    P = 19
    res = score_sequence(target, draft, ids, P, modes=["next"])
    with torch.no_grad():
        feats = extract_features(target(ids, output_hidden_states=True).hidden_states, draft.target_layer_ids)
        rows = torch.stack([_inference_block(draft, target, feats, ids, t - 1)[1] for t in range(P, 30)])
    ref = gold_scores(rows, ids[0, P:])
    assert res["next"]["draft"]["rank"].tolist() == ref["rank"].tolist()
    np.testing.assert_allclose(res["next"]["draft"]["logp"], ref["logp"], atol=1e-4)
    assert res["next"]["draft"]["k"].tolist() == [1] * (30 - P)
    # and the target numbers are the target's own next-token log-probs
    full = torch.log_softmax(target(ids).logits[0, P - 1 : -1], -1)
    np.testing.assert_allclose(res["target"]["logp"], full[torch.arange(30 - P), ids[0, P:]].numpy(), atol=1e-5)


def test_block_mode_equals_speculative_decoding_blocks():
    """Every full block speculative decoding drafts (anchor s = the last committed token) is reproduced by
    block mode with the answer starting right after s: offsets k = 1..B-1 give the same scores."""
    target = tiny_target(vocab=12, seed=1)
    draft = tiny_draft(target, mask_token_id=11, seed=11, block_size=4)
    prompt = torch.randint(0, 11, (1, 10), generator=torch.Generator().manual_seed(0))
    seen = []
    hook = draft.register_forward_hook(lambda m, args, out: seen.append((int(args[2][0, -args[0].shape[1]]), args[0].shape[1], out)))
    tokens, stats = speculative_generate(target, draft, prompt, 30)
    hook.remove()
    full = [(s, out) for s, n, out in seen if n == draft.block_size and s > prompt.shape[1]]
    assert len(full) >= 3
    B = draft.block_size
    for s, out in full:
        n_ans = min(B - 1, tokens.shape[1] - s - 1)
        ids = tokens[:, : s + 1 + n_ans]
        res = score_sequence(target, draft, ids, s + 1, modes=["block"])["block"]["draft"]
        with torch.no_grad():
            ref = gold_scores(draft.logits(out[:, :n_ans], target)[0], ids[0, s + 1 :])  # decoding reads offsets 1.. only
        assert res["k"].tolist() == list(range(1, n_ans + 1))
        assert res["rank"].tolist() == ref["rank"].tolist()
        np.testing.assert_allclose(res["logp"], ref["logp"], atol=1e-4)


def test_block_mode_tiles_the_answer_with_offsets(pair):
    target, draft, _ = pair  # block size 8: 7 tokens per block
    ids = torch.randint(4, 90, (1, 40), generator=torch.Generator().manual_seed(3))
    res = score_sequence(target, draft, ids, 20, modes=["block", "next"])
    assert res["block"]["draft"]["k"].tolist() == [1, 2, 3, 4, 5, 6, 7] * 2 + [1, 2, 3, 4, 5, 6]
    # offset 1 of a block is the same computation as next mode at that anchor
    for j in (0, 7, 14):
        assert res["block"]["draft"]["logp"][j] == pytest.approx(res["next"]["draft"]["logp"][j], abs=1e-5)


# -- rows, tags, skipping -----------------------------------------------------------------------------
def test_tasks_without_reference_are_skipped_and_counted(pair):
    _, _, tok = pair
    rows = [_task("a", "tulip"), _task("b"), _task("c", "   "), _task("d", "xy")]
    p = prepare_tasks(rows, tok)
    assert [t.task_id for t in p.tasks] == ["a", "d"]
    assert [s["task_id"] for s in p.skipped] == ["b", "c"]
    p = prepare_tasks(rows, tok, references={"b": "from another run", "a": ""})
    assert [t.task_id for t in p.tasks] == ["b"] and "".join(p.tasks[0].answer_tokens) == "from another run"
    assert len(p.skipped) == 3


def test_tags(pair):
    target, draft, tok = pair
    p = prepare_tasks([_task("a", "tulip!")], tok, solved={"a": True})
    recs = diagnose(target, draft, p, modes=["next"], controls=())
    assert [r["token"] for r in recs] == list("tulip!")
    assert [r["in_context"] for r in recs] == [True] * 5 + [False]  # "!" is in neither system nor user turn
    assert [r["first"] for r in recs] == [True] + [False] * 5
    assert all(r["solved"] is True and r["category"] == "A" and r["subcategory"] == "a" for r in recs)
    for r in recs:
        p_t = r["target"]["p"]
        want = "p<0.01" if p_t < 0.01 else "0.01<=p<0.1" if p_t < 0.1 else "0.1<=p<0.5" if p_t < 0.5 else "p>=0.5"
        assert r["bucket"] == want


# -- the command --------------------------------------------------------------------------------------
def test_cli_writes_tokens_summary_report_and_figures(tmp_path, tiny_target_dir, tiny_draft_dir, capsys):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(r) + "\n" for r in [_task("t0", "tulip"), _task("t1", "12 and 3", "B", "b"), _task("t2")]))
    out = tmp_path / "out"
    argv = ["diagnose", "--target", str(tiny_target_dir), "--draft", str(tiny_draft_dir), "--tasks", str(tasks),
            "--out", str(out), "--solve-max-new-tokens", "4", "--n-boot", "100"]
    assert main(argv) == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert s["n_tasks"] == 2 and s["n_skipped"] == 1 and s["n_tokens"] == len("tulip") + len("12 and 3")
    assert s["verdict"] in {"draft_better", "draft_equal", "draft_worse"}
    assert s["n_solved"] + s["n_failed"] == 2  # computed by greedy eval (both tasks have checks)
    assert set(s["modes"]) == {"next", "block"}
    a = s["modes"]["next"]["all"]
    assert set(a["mean_logp"]) == {"target", "draft", "noise", "random"} and len(a["mean_logp"]["draft"]["ci95"]) == 2
    assert "offset:1" in s["modes"]["block"]
    rows = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    assert len(rows) == s["n_tokens"] * 7  # target + {draft, noise, random} x {next, block}
    assert {r["pathway"] for r in rows} == {"target", "draft_next", "noise_next", "random_next", "draft_block",
                                            "noise_block", "random_block"}
    assert all(r["rank"] >= 1 and r["logp"] <= 0 for r in rows)
    report = (out / "report.md").read_text()
    assert "draftguide diagnose --tasks" in report and s["verdict"] in report
    for png in ("heatmap.png", "rank_by_offset.png", "by_bucket_next.png", "by_category_block.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in report

    # a second run: references and solve status from the first run's greedy eval; next mode only, no controls
    res = out / "solve" / "results.jsonl"
    out2 = tmp_path / "out2"
    assert main(["diagnose", "--target", str(tiny_target_dir), "--draft", str(tiny_draft_dir), "--tasks", str(tasks),
                 "--out", str(out2), "--modes", "next", "--no-controls", "--reference-from", str(res),
                 "--solved-from", str(res), "--n-boot", "50"]) == 0
    s2 = json.loads((out2 / "summary.json").read_text())
    eval_rows = {r["task_id"]: r for r in map(json.loads, res.read_text().splitlines())}
    assert s2["n_tasks"] + s2["n_skipped"] == 3 and set(s2["modes"]) == {"next"}
    for r in map(json.loads, (out2 / "tokens.jsonl").read_text().splitlines()):
        assert r["solved"] == bool(eval_rows[r["task_id"]]["score"])
        assert r["pathway"] in {"target", "draft_next"}


def test_cli_rejects_bad_modes(tmp_path, capsys):
    assert main(["diagnose", "--modes", "next,sideways", "--out", str(tmp_path)]) == 2
    assert "--modes" in capsys.readouterr().err
