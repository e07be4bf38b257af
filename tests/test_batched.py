"""Batched decoding (`batched.batch_generate`): every row equals its batch-1 decoding token for token (float64 tiny
models), with left padding, per-row positions, both caches, and rows leaving the batch as they finish."""

import pytest
import torch

from conftest import VOCAB, tiny_draft, tiny_target
from draftguide.decode.baselines import sample_generate
from draftguide.decode.batched import batch_generate, left_pad
from draftguide.decode.guided import guided_generate
from draftguide.decode.speculative import greedy_generate
from draftguide.modeling.draft import DFlashDraft, DraftCache

LENS = [3, 11, 1, 7, 20]
BUDGETS = [9, 25, 14, 4, 6]  # the longest prompt ends first: its padding columns are dropped mid-run


@pytest.fixture(scope="module")
def f64():
    t = tiny_target("qwen3").double()
    return t, tiny_draft(t).double()


@pytest.fixture(scope="module")
def f64_llama():
    t = tiny_target("llama", seed=3).double()
    return t, tiny_draft(t, seed=4).double()


@pytest.fixture(scope="module")
def f64_aligned():
    t = tiny_target("qwen3", seed=5).double()
    d = (
        DFlashDraft.for_target(
            t,
            num_layers=2,
            block_size=4,
            mask_token_id=VOCAB - 1,
            target_layer_ids=[1, 3, 4],
            context_includes_anchor=True,
            seed=6,
        )
        .eval()
        .requires_grad_(False)
        .double()
    )
    return t, d


def prompts(lens=LENS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB - 2, (1, n), generator=g) for n in lens]


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def new_tokens(tokens, ids):
    return tokens[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("max_batch", [None, 2])
@pytest.mark.parametrize("pair", ["f64", "f64_llama"])
def test_greedy_rows_equal_batch_one(pair, max_batch, request):
    target, _ = request.getfixturevalue(pair)
    ps = prompts()
    ref = [new_tokens(greedy_generate(target, p, m)[0], p) for p, m in zip(ps, BUDGETS)]
    rows = batch_generate(target, ps, BUDGETS, max_batch=max_batch)
    assert [r.tokens for r in rows] == ref
    assert [len(r.tokens) for r in rows] == BUDGETS and all(r.finish_reason == "length" for r in rows)


def test_stop_tokens_end_rows_early(f64):
    target, _ = f64
    ps = prompts()
    free = [new_tokens(greedy_generate(target, p, 25)[0], p) for p in ps]
    stop = [free[1][5], free[3][2]]  # tokens that occur mid-answer in two rows
    ref = [new_tokens(greedy_generate(target, p, 25, stop)[0], p) for p in ps]
    assert any(len(r) < 25 for r in ref)
    rows = batch_generate(target, ps, 25, stop_token_ids=stop)
    assert [r.tokens for r in rows] == ref
    assert [r.finish_reason for r in rows] == ["stop" if r[-1] in stop else "length" for r in ref]


def test_sampling_with_a_seed_per_row(f64):
    target, _ = f64
    ps = prompts()
    temps, top_p, top_k, seeds = (
        [1.0, 0.7, 0.0, 1.5, 1.0],
        [1.0, 0.9, 1.0, 0.8, 1.0],
        [0, 0, 0, 10, 5],
        [11, 12, 13, 14, 15],
    )
    ref = [
        new_tokens(sample_generate(target, p, temperature=t, top_p=tp, top_k=tk, max_new_tokens=m, generator=g)[0], p)
        for p, t, tp, tk, m, g in zip(ps, temps, top_p, top_k, BUDGETS, gens(seeds))
    ]
    rows = batch_generate(target, ps, BUDGETS, temperature=temps, top_p=top_p, top_k=top_k, generators=gens(seeds))
    assert [r.tokens for r in rows] == ref
    rows = batch_generate(
        target, ps, BUDGETS, temperature=temps, top_p=top_p, top_k=top_k, generators=gens(seeds), max_batch=3
    )
    assert [r.tokens for r in rows] == ref
    # and the seed matters: other seeds draw other tokens somewhere
    other = batch_generate(
        target, ps, BUDGETS, temperature=temps, top_p=top_p, top_k=top_k, generators=gens([1, 2, 3, 4, 5])
    )
    assert [r.tokens for r in other] != ref


GUIDED = [
    dict(beta=0.5, mix="logits"),
    dict(beta=0.7, mix="probs"),
    dict(beta=1.0, mix="logits"),
    dict(beta=0.6, mix="logits", beta_schedule="adaptive", guard_top_k=5),
    dict(beta=0.5, mix="logits", control="noise"),
]


@pytest.mark.parametrize("max_batch", [None, 2])
@pytest.mark.parametrize("opts", GUIDED, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("pair", ["f64", "f64_aligned"])
def test_guided_rows_equal_batch_one(pair, opts, max_batch, request):
    target, draft = request.getfixturevalue(pair)
    ps = prompts(seed=2)
    temps, seeds = [0.0, 1.0, 0.0, 0.8, 0.0], [3, 4, 5, 6, 7]
    ref, flips = [], []
    for p, m, t, g in zip(ps, BUDGETS, temps, gens(seeds)):
        out, st = guided_generate(target, draft, p, max_new_tokens=m, temperature=t, generator=g, **opts)
        ref.append(new_tokens(out, p))
        flips.append([(f.index, f.target_token, f.guided_token) for f in st.flips])
    rows = batch_generate(
        target, ps, BUDGETS, temperature=temps, generators=gens(seeds), draft=draft, max_batch=max_batch, **opts
    )
    assert [r.tokens for r in rows] == ref
    assert [[(f.index, f.target_token, f.guided_token) for f in r.stats.flips] for r in rows] == flips
    if opts["beta"] >= 0.5 and opts.get("control") is None:
        assert any(flips), "guidance should flip some token, or the test shows nothing"


def test_guided_without_shared_head(f64, monkeypatch):
    """The path with two head calls (drafts with an output scale or softcap) decodes the same."""
    import draftguide.decode.guided as guided

    target, draft = f64
    ps = prompts(seed=4)
    ref = [new_tokens(guided_generate(target, draft, p, beta=0.5, max_new_tokens=m)[0], p) for p, m in zip(ps, BUDGETS)]
    monkeypatch.setattr(guided, "shared_head", lambda s, out: None)
    assert [r.tokens for r in batch_generate(target, ps, BUDGETS, draft=draft, beta=0.5)] == ref


def test_on_token_ends_one_row_only(f64):
    target, draft = f64
    ps = prompts()
    ref = [new_tokens(guided_generate(target, draft, p, beta=0.5, max_new_tokens=12)[0], p) for p in ps]
    seen = {i: [] for i in range(len(ps))}

    def on_token(row, tok):
        seen[row].append(tok)
        return row == 1 and len(seen[row]) == 3  # row 1's client went away after 3 tokens

    rows = batch_generate(target, ps, 12, draft=draft, beta=0.5, on_token=on_token)
    assert rows[1].tokens == ref[1][:3] and rows[1].finish_reason == "stop"
    assert [r.tokens for i, r in enumerate(rows) if i != 1] == [r for i, r in enumerate(ref) if i != 1]
    assert [seen[i] for i in range(len(ps))] == [r.tokens for r in rows]


def test_draft_context_mask_hides_pads(f64):
    """The cached draft step with left-padded context (garbage in the pads) equals the unpadded one per row."""
    target, draft = f64
    g = torch.Generator().manual_seed(0)
    width = draft.fc.in_features
    ctxs = [torch.randn(1, n, width, generator=g, dtype=torch.float64) for n in (4, 9)]
    blocks = [torch.randint(0, VOCAB - 2, (1, draft.block_size), generator=g) for _ in ctxs]
    ref = []
    for c, blk in zip(ctxs, blocks):
        n = c.shape[1]
        pos = torch.cat([torch.arange(n), torch.arange(n, n + draft.block_size)])[None]
        ref.append(draft(draft.embed(target, blk), c, pos, cache=DraftCache(len(draft.layers)), rows=slice(1, 3)))
    C = 9
    padded = torch.randn(2, C, width, generator=g, dtype=torch.float64) * 100  # garbage where padding is
    mask = torch.zeros(2, C, dtype=torch.bool)
    pos = torch.zeros(2, C + draft.block_size, dtype=torch.long)
    for i, c in enumerate(ctxs):
        n = c.shape[1]
        padded[i, C - n :], mask[i, C - n :] = c[0], True
        pos[i, C - n : C] = torch.arange(n)
        pos[i, C:] = torch.arange(n, n + draft.block_size)
    cache = DraftCache(len(draft.layers))
    # context in two pieces (cached, then new), as decoding feeds it
    draft(
        draft.embed(target, torch.cat(blocks)),
        padded[:, :5],
        torch.cat([pos[:, :5], pos[:, C:]], 1),
        cache=cache,
        rows=slice(1, 3),
        context_mask=mask[:, :5],
    )
    cache.crop(5)
    out = draft(
        draft.embed(target, torch.cat(blocks)),
        padded[:, 5:],
        pos[:, 5:],
        cache=cache,
        rows=slice(1, 3),
        context_mask=mask,
    )
    for i in range(2):
        torch.testing.assert_close(out[i : i + 1], ref[i], rtol=1e-10, atol=1e-10)
    unmasked = draft(
        draft.embed(target, torch.cat(blocks)), padded, pos, cache=DraftCache(len(draft.layers)), rows=slice(1, 3)
    )
    assert not torch.allclose(unmasked[0:1], ref[0], atol=1e-3)  # without the mask the pads do leak in


def test_left_pad_layout():
    ids, mask = left_pad([torch.tensor([[5, 6]]), torch.tensor([7, 8, 9])], pad_id=0)
    assert ids.tolist() == [[0, 5, 6], [7, 8, 9]] and mask.tolist() == [[False, True, True], [True, True, True]]


def test_waiting_prompts_take_freed_slots(f64):
    """Continuous batching: with max_batch 2, a waiting prompt joins (its own prefill, then the shared batch) as
    soon as a row finishes, so every step decodes 2 rows while prompts wait; `on_done` sees rows as they finish."""
    target, draft = f64
    ps, budgets = prompts(), [3, 9, 2, 5, 4]
    sizes, done = [], []
    hook = draft.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    try:
        rows = batch_generate(
            target, ps, budgets, max_batch=2, draft=draft, beta=0.5, on_done=lambda r, res: done.append(r)
        )
    finally:
        hook.remove()
    # rows 0+1 for 3 steps, 1+2 for 2, 1+3 for 4, 3+4 for 1, then row 4 alone for its last 3 tokens
    assert sizes == [2] * 10 + [1] * 3 and done == [0, 2, 1, 3, 4]
    assert [len(r.tokens) for r in rows] == budgets


def test_finished_rows_leave_the_batch(f64):
    """Prefill runs row by row (no compute on padding); then each target forward carries only the live rows, and
    columns that are padding in every live row are gone (after the 7- and 20-token rows end, the widest live
    prompt has 11 tokens)."""
    target, _ = f64
    shapes = []

    def record(m, a, kw):
        am = kw.get("attention_mask")
        shapes.append((kw["input_ids"].shape[0], kw["input_ids"].shape[1], None if am is None else am.shape[1]))

    hook = target.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        batch_generate(target, prompts(), BUDGETS)
    finally:
        hook.remove()
    assert shapes[:5] == [(1, n, None) for n in LENS]  # the prefills, unpadded
    steps = shapes[5:]
    sizes = [s[0] for s in steps]
    assert sizes[0] == 5 and sizes[-1] == 1 and sizes == sorted(sizes, reverse=True)
    assert steps[5] == (3, 1, 11 + 6) and len(steps) == max(BUDGETS) - 1  # one forward per token fed


# -- eval --batch-size ------------------------------------------------------------------------------
def _eval_tasks(tmp_path):
    import json

    rows = []
    for i, q in enumerate(["hi", "what is the capital of France, and why?", "2+2", "name three colours", "ok?"]):
        rows.append(
            {
                "messages": [{"role": "system", "content": f"context {i} " * (i + 1)}, {"role": "user", "content": q}],
                "checks": [{"type": "regex", "value": "."}],
                "metadata": {"task_id": f"t{i}"},
            }
        )
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _responses(out):
    import json

    return {
        r["task_id"]: (r["response"], r["new_tokens"])
        for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())
    }


@pytest.mark.parametrize(
    "method",
    [
        ["--method", "greedy"],
        ["--method", "sample", "--temperature", "1.0", "--seed", "3"],
        ["--method", "guided", "--beta", "0.5"],
        ["--method", "guided-noise", "--beta", "0.5"],
    ],
    ids=lambda m: m[1],
)
def test_eval_batch_size_gives_the_batch_one_answers(method, tmp_path, tiny_target_dir, tiny_draft_dir, capsys):
    import json

    from draftguide.app.cli import main

    tasks = _eval_tasks(tmp_path)
    draft = ["--draft", str(tiny_draft_dir)] if "guided" in method[1] else []
    base = ["eval", "--target", str(tiny_target_dir), "--tasks", str(tasks), "--max-new-tokens", "12", *draft, *method]
    assert main([*base, "--out", str(tmp_path / "b1")]) == 0
    assert main([*base, "--out", str(tmp_path / "b3"), "--batch-size", "3"]) == 0
    one, three = _responses(tmp_path / "b1"), _responses(tmp_path / "b3")
    assert one == three and len(one) == 5
    rows = [json.loads(x) for x in (tmp_path / "b3" / "results.jsonl").read_text().splitlines()]
    assert [r["batch_size"] for r in rows] == [3] * 5 and [r["task_id"] for r in rows] == [f"t{i}" for i in range(5)]
    if method[1] == "guided":
        assert any(r["flips"] for r in rows) and all("mean_beta" in r for r in rows)
        # the flips are the batch-1 flips, with the words the matrix's 2.5 tags read
        ones = {r["task_id"]: r for r in map(json.loads, (tmp_path / "b1" / "results.jsonl").read_text().splitlines())}
        assert all(r["flips"] == ones[r["task_id"]]["flips"] for r in rows)
        assert all("guided_word" in f for r in rows for f in r["flips"])


def test_eval_batch_size_with_a_batch_one_method_says_so(tmp_path, tiny_target_dir, capsys):
    from draftguide.app.cli import main

    tasks = _eval_tasks(tmp_path)
    assert (
        main(
            [
                "eval",
                "--target",
                str(tiny_target_dir),
                "--tasks",
                str(tasks),
                "--max-new-tokens",
                "4",
                "--limit",
                "2",
                "--method",
                "dola",
                "--out",
                str(tmp_path / "d"),
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    assert "method 'dola' decodes one sequence at a time" in capsys.readouterr().err
    assert len(_responses(tmp_path / "d")) == 2


# -- make-data ---------------------------------------------------------------------------------------
def test_make_data_uses_the_batched_loop(tmp_path, f64):
    """Greedy samples are each prompt's batch-1 greedy answer; sampled ones do not depend on the batch size."""
    from conftest import char_tokenizer
    from draftguide.modeling.prompts import encode_prompt, stop_token_ids
    from draftguide.training.data import _row_seed, make_data, read_samples

    target, _ = f64
    tok = char_tokenizer()
    rows = [
        {"id": f"p{i}", "messages": [{"role": "user", "content": q}]}
        for i, q in enumerate(["hi", "a longer one, yes", "mid"])
    ]
    make_data(target, tok, rows, tmp_path / "g", max_new_tokens=10, batch_size=2, progress=False)
    got = {r["id"]: r["input_ids"] for r in read_samples(tmp_path / "g")}
    stop = stop_token_ids(tok, target)
    for r in rows:
        ids = encode_prompt(tok, r)
        assert got[r["id"]] == greedy_generate(target, ids, 10, stop)[0][0].tolist()
    for bs in (1, 3):
        make_data(
            target,
            tok,
            rows,
            tmp_path / f"s{bs}",
            max_new_tokens=10,
            temperature=1.0,
            batch_size=bs,
            seed=7,
            progress=False,
        )
    s1, s3 = ({r["id"]: r["input_ids"] for r in read_samples(tmp_path / f"s{bs}")} for bs in (1, 3))
    assert s1 == s3 and s1 != got
    ids = encode_prompt(tok, rows[1])
    ref = sample_generate(
        target,
        ids,
        temperature=1.0,
        max_new_tokens=10,
        stop_token_ids=stop,
        generator=torch.Generator().manual_seed(_row_seed(7, "p1")),
    )[0]
    assert s1["p1"] == ref[0].tolist()


# -- DraftGuide.generate with a list of prompts, jobs with their own parameters -------------------------
@pytest.fixture(scope="module")
def dg64():
    from conftest import char_tokenizer
    from draftguide import DraftGuide

    t = tiny_target().double()
    return DraftGuide(t, char_tokenizer(), tiny_draft(t, mask_token_id=3).double(), name="tiny64")


PROMPTS = [
    "hello",
    "a much longer question about nothing at all",
    [{"role": "user", "content": "mid one"}],
    {"prompt": "raw"},
]


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(temperature=1.0, seed=5),
        dict(beta=0.5),
        dict(beta=0.5, temperature=0.9, seed=2),
        dict(speculative=True),
    ],
    ids=str,
)
def test_generate_a_list_equals_one_by_one(dg64, kw):
    many = dg64.generate(PROMPTS, max_new_tokens=10, **kw)
    alone = [dg64.generate(p, max_new_tokens=10, **kw) for p in PROMPTS]
    assert [g.tokens for g in many] == [g.tokens for g in alone]
    assert [g.text for g in many] == [g.text for g in alone] and [g.method for g in many] == [g.method for g in alone]
    if not kw.get("speculative"):
        assert all(g.stats["batch_size"] == len(PROMPTS) for g in many)


def test_jobs_keep_their_own_parameters_stop_strings_and_streams(dg64):
    from draftguide.app.pipeline import Cancelled, Job

    kws = [
        dict(max_new_tokens=12),
        dict(max_new_tokens=5, temperature=1.0, seed=9),
        dict(max_new_tokens=12, top_k=3, temperature=1.0, seed=1),
        dict(max_new_tokens=12, beta=0.5),
        dict(max_new_tokens=12, speculative=True),
    ]
    alone = [dg64.generate("hello there", **k) for k in kws]
    stop = alone[0].text[3:5]  # a stop string inside the first answer
    kws[0]["stop"] = [stop]
    ref0 = dg64.generate("hello there", **kws[0])
    assert ref0.finish_reason == "stop" and len(ref0.tokens) < 12
    pieces = {i: [] for i in range(len(kws))}

    def collect(i):
        def on_text(delta):
            pieces[i].append(delta)
            if i == 2 and len(pieces[i]) == 2:
                raise Cancelled  # this client goes away; the others go on

        return on_text

    out = dg64.generate_jobs([Job("hello there", dict(k), collect(i)) for i, k in enumerate(kws)])
    assert out[0].tokens == ref0.tokens and out[0].text == ref0.text and out[0].finish_reason == "stop"
    assert [g.tokens for g in out[3:]] == [g.tokens for g in alone[3:]] and out[1].tokens == alone[1].tokens
    assert "batch_size" not in out[3].stats and out[0].stats["batch_size"] == 3  # guided beta 0.5: alone, batch-1 loop
    assert out[2].tokens == alone[2].tokens[: len(out[2].tokens)] and len(out[2].tokens) < len(alone[2].tokens)
    for i in (0, 1, 3, 4):
        assert "".join(pieces[i]) == out[i].text


def test_bad_batch_size_is_refused_before_loading(tmp_path, capsys):
    from draftguide.app.cli import main

    assert (
        main(
            [
                "eval",
                "--target",
                str(tmp_path / "no-such-model"),
                "--tasks",
                "builtin",
                "--out",
                str(tmp_path / "o"),
                "--batch-size",
                "0",
            ]
        )
        == 2
    )
    assert "--batch-size must be >= 1" in capsys.readouterr().err
