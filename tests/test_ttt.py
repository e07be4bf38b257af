"""Test-time training of the draft (ttt.py): LoRA via peft on tiny models, CPU, seconds."""

import copy

import pytest
import torch

from conftest import mixed_acceptance_pair, tiny_draft, tiny_target
from draftguide.decode.speculative import speculative_generate
from draftguide.errors import DraftGuideError
from draftguide.modeling.draft import DFlashDraft, multi_block_hidden
from draftguide.modeling.targets import extract_features
from draftguide.training.ttt import AdaptedDraft, evenly_spaced_anchors, load_adapter, ttt_adapt


def _context(T=96, seed=0, vocab=90):
    return torch.randint(0, vocab, (1, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _block_logits(draft, target, ids):
    """Logits of blocks anchored at a few positions, and of one cached inference block."""
    feats = extract_features(target(ids, output_hidden_states=True).hidden_states, draft.target_layer_ids)
    anchors = torch.tensor([[1, 7, 30, ids.shape[1] - 2]])
    multi = draft.logits(multi_block_hidden(draft, target, feats, ids, anchors), target)
    block = torch.full((1, draft.block_size), draft.mask_token_id)
    block[0, 0] = ids[0, -1]
    pos = torch.arange(ids.shape[1] - 1 + draft.block_size)[None]
    cached = draft.logits(draft(draft.embed(target, block), feats[:, :-1], pos), target)
    return multi, cached


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def pair():
    t = tiny_target()
    return t, tiny_draft(t)


def test_zero_initialised_adapters_leave_logits_identical(pair):
    target, draft = pair
    ids = _context()
    with ttt_adapt(draft, target, ids, steps=0) as adapted:
        assert isinstance(adapted, DFlashDraft) and adapted.lora_modules()  # adapters are really there
        for ours, base in zip(_block_logits(adapted, target, ids), _block_logits(draft, target, ids)):
            assert torch.equal(ours, base)


def test_zero_initialised_adapters_give_identical_speculation():
    target, draft, prompt = mixed_acceptance_pair()
    base_tokens, base_stats = speculative_generate(target, draft, prompt, 60)
    with ttt_adapt(draft, target, prompt, steps=0, target_modules=("fc", "q_proj", "k_proj", "v_proj")) as adapted:
        tokens, stats = speculative_generate(target, adapted, prompt, 60)
    assert max(base_stats.acceptance_lengths) >= 3  # a non-trivial acceptance pattern
    assert torch.equal(tokens, base_tokens)
    assert stats.acceptance_lengths == base_stats.acceptance_lengths


def test_context_loss_decreases(pair):
    target, draft = pair
    adapted = ttt_adapt(draft, target, _context(120), steps=30, lr=3e-3)
    r = adapted.report
    assert r.steps == 30 and len(r.train_losses) == 30 and r.n_context_tokens == 120
    assert r.loss_after < 0.8 * r.loss_before
    assert sum(r.acc_after) > sum(r.acc_before)
    assert r.seconds > 0 and r.prefill_seconds > 0 and r.peak_mem_bytes > 0
    adapted.reset()


def test_base_weights_bit_identical_and_untouched(pair):
    target, draft = pair
    before = _state(draft)
    flags = {n: p.requires_grad for n, p in draft.named_parameters()}
    adapted = ttt_adapt(draft, target, _context(), steps=5, lr=1e-2)
    assert adapted.fc.base_layer.weight.data_ptr() == draft.fc.weight.data_ptr()  # shared, not copied
    changed = _block_logits(adapted, target, _context())[0]
    assert not torch.equal(changed, _block_logits(draft, target, _context())[0])  # TTT did something
    assert adapted.reset() is draft
    assert not adapted.lora_modules()
    after = _state(draft)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in draft.named_parameters()} == flags
    assert all(type(m) is torch.nn.Linear for n, m in draft.named_modules() if n.endswith(("fc", "_proj")))


def test_context_manager_resets(pair):
    target, draft = pair
    with ttt_adapt(draft, target, _context(), steps=2) as adapted:
        assert adapted.lora_modules()
    assert not adapted.lora_modules()


def test_target_gets_no_gradients():
    target = tiny_target(seed=5).requires_grad_(True)
    draft = tiny_draft(target)
    ttt_adapt(draft, target, _context(), steps=3).reset()
    assert all(p.grad is None for p in target.parameters())
    assert all(p.requires_grad for p in target.parameters())  # flags restored
    assert all(p.grad is None for p in draft.parameters())


def test_deterministic_for_a_seed(pair):
    target, draft = pair
    a = ttt_adapt(draft, target, _context(), steps=4, seed=3)
    b = ttt_adapt(draft, target, _context(), steps=4, seed=3)
    c = ttt_adapt(draft, target, _context(), steps=4, seed=4)
    assert a.report.train_losses == b.report.train_losses != c.report.train_losses
    assert all(torch.equal(x, y) for x, y in zip(a.merged().state_dict().values(), b.merged().state_dict().values()))


def test_fc_only_and_options_for_big_models(pair):
    target, draft = pair
    ids = _context()
    fc = ttt_adapt(draft, target, ids, steps=3, target_modules=("fc",))
    assert list(fc.lora_modules()) == ["fc"]
    plain = ttt_adapt(draft, target, ids, steps=3, lr=3e-3)
    calls = []
    real = torch.utils.checkpoint.checkpoint
    with pytest.MonkeyPatch.context() as mp:  # count the recomputed layers: the option must really engage
        mp.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
        ckpt = ttt_adapt(draft, target, ids, steps=3, lr=3e-3, gradient_checkpointing=True)
    assert len(calls) >= 3 * len(draft.layers)
    torch.testing.assert_close(torch.tensor(ckpt.report.train_losses), torch.tensor(plain.report.train_losses))
    fp32 = ttt_adapt(draft, target, _context(120), steps=20, lr=3e-3)
    bf16 = ttt_adapt(draft, target, _context(120), steps=20, lr=3e-3, autocast_dtype="bf16")
    assert bf16.report.train_losses != fp32.report.train_losses  # autocast changed the arithmetic
    assert bf16.report.loss_after < bf16.report.loss_before


def test_a_longer_run_passes_through_the_shorter_one(pair):
    """sweep ttt reads an s-step run off one longer run (constant lr): the adapted draft at step 2 of a 4-step
    run must equal a 2-step run exactly."""
    target, draft = pair
    seen = {}
    ttt_adapt(
        draft,
        target,
        _context(),
        steps=4,
        seed=1,
        on_step=lambda step, d: seen.setdefault(step, [t.clone() for t in d.merged().state_dict().values()]),
    )
    two = ttt_adapt(draft, target, _context(), steps=2, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(seen[2], two.merged().state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(seen[2], seen[4]))


def test_merged_draft_equals_adapted_and_saves_in_official_format(pair, tmp_path):
    import dflash.model as official

    target, draft = pair
    ids = _context()
    adapted = ttt_adapt(draft, target, ids, steps=5, lr=1e-2)
    merged = adapted.merged()
    assert type(merged) is DFlashDraft and set(merged.state_dict()) == set(draft.state_dict())
    for a, m in zip(_block_logits(adapted, target, ids), _block_logits(merged, target, ids)):
        torch.testing.assert_close(a, m, atol=1e-4, rtol=1e-5)
    adapted.save_pretrained(tmp_path / "ours")  # an adapted draft saves as its merged draft
    back = DFlashDraft.from_pretrained(tmp_path / "ours")
    assert all(torch.equal(x, y) for x, y in zip(back.state_dict().values(), merged.state_dict().values()))
    ref = official.DFlashDraftModel.from_pretrained(tmp_path / "ours").eval()
    feats = extract_features(target(ids, output_hidden_states=True).hidden_states, draft.target_layer_ids)
    emb = merged.embed(target, torch.full((1, merged.block_size), merged.mask_token_id))
    pos = torch.arange(ids.shape[1] + merged.block_size)[None]
    with torch.no_grad():
        torch.testing.assert_close(
            ref(position_ids=pos, noise_embedding=emb, target_hidden=feats),
            merged(emb, feats, pos),
            atol=1e-5,
            rtol=1e-5,
        )


@torch.no_grad()
def _logits_on(draft, target, feats, ids):
    anchors = torch.tensor([[1, 7, 30, ids.shape[1] - 2]])
    return draft.logits(multi_block_hidden(draft, target, feats, ids, anchors), target)


def test_fc_adapter_reads_standardised_features_and_merges_back(pair, tmp_path):
    """Features with a few dimensions ~100x larger than the rest (as a trained draft's fc sees them): the fc
    adapter's input is standardised per dimension (RMS within a factor sqrt 2 of 1, exact powers of two), the
    base fc still reads raw features, and the merged draft and the saved peft adapter compute the same."""
    from peft import PeftModel

    from draftguide.training.ttt import context_feature_scale

    target, draft = pair
    ids = _context(120, seed=3)
    with torch.no_grad():
        feats = extract_features(target(ids, output_hidden_states=True).hidden_states, draft.target_layer_ids)
    feats[..., [3, 70, 150]] *= 100.0
    seen = {}
    adapted = ttt_adapt(draft, target, ids, features=feats, steps=6, lr=3e-3)
    a_in = adapted.fc.lora_A["default"]
    hook = a_in.register_forward_hook(lambda m, args, out: seen.__setitem__("a", args[0].detach().clone()))
    base_hook = adapted.fc.base_layer.register_forward_hook(
        lambda m, args, out: seen.__setitem__("w", args[0].detach().clone())
    )
    ours = _logits_on(adapted, target, feats, ids)
    hook.remove(), base_hook.remove()
    scale = context_feature_scale(feats)
    assert torch.equal(scale, torch.exp2(torch.log2(scale).round()))  # powers of two: x / s is exact
    assert torch.equal(seen["w"], feats) and torch.equal(seen["a"], feats / scale)
    rms = (feats / scale)[0, 1:].pow(2).mean(0).sqrt()
    assert rms.min() > 0.7 and rms.max() < 1.42
    r = adapted.report
    assert r.standardize_fc and r.fc_scale_spread >= 64 and r.loss_after < r.loss_before
    # merged: the scale folded back into fc (W + scaling B A diag(1/s)); same outputs
    merged = adapted.merged()
    torch.testing.assert_close(_logits_on(merged, target, feats, ids), ours, atol=1e-4, rtol=1e-5)
    assert not torch.equal(merged.fc.weight, draft.fc.weight)  # TTT changed fc
    # the saved adapter is plain peft on raw features (A / s), exactly the same function; saving leaves us as we were
    adapted.save_adapter(tmp_path / "a")
    assert torch.equal(_logits_on(adapted, target, feats, ids), ours)
    loaded = load_adapter(draft, tmp_path / "a")
    assert loaded.fc_scale is None and torch.equal(_logits_on(loaded, target, feats, ids), ours)
    pm = PeftModel.from_pretrained(copy.deepcopy(draft), str(tmp_path / "a"))
    torch.testing.assert_close(_logits_on(pm.base_model.model, target, feats, ids), ours, atol=1e-5, rtol=1e-5)
    # the other geometry is really different: raw inputs, other training trajectory; zero steps: the base exactly
    raw = ttt_adapt(draft, target, ids, features=feats, steps=6, lr=3e-3, standardize_fc=False)
    assert raw.fc_scale is None and not raw.report.standardize_fc and raw.report.train_losses != r.train_losses
    with ttt_adapt(draft, target, ids, features=feats, steps=0) as zero:
        assert zero.fc_scale is not None and torch.equal(
            _logits_on(zero, target, feats, ids), _logits_on(draft, target, feats, ids)
        )
    assert zero.fc_scale is None and not zero.lora_modules()
    no_fc = ttt_adapt(draft, target, ids, features=feats, steps=1, target_modules=("q_proj",))
    assert no_fc.fc_scale is None and not no_fc.report.standardize_fc


def test_adapter_saves_and_loads_in_peft_format(pair, tmp_path):
    from peft import PeftModel

    target, draft = pair
    ids = _context()
    adapted = ttt_adapt(draft, target, ids, steps=5, lr=1e-2)
    adapted.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "ttt_report.json").is_file()
    loaded = load_adapter(draft, tmp_path / "adapter")
    for a, b in zip(_block_logits(adapted, target, ids), _block_logits(loaded, target, ids)):
        assert torch.equal(a, b)
    # plain peft reads it too, onto a copy of the base draft
    pm = PeftModel.from_pretrained(copy.deepcopy(draft), str(tmp_path / "adapter"))
    for a, b in zip(_block_logits(adapted, target, ids), _block_logits(pm.base_model.model, target, ids)):
        assert torch.equal(a, b)
    with pytest.raises(DraftGuideError, match="adapter_config.json"):
        load_adapter(draft, tmp_path)


def test_works_inside_inference_mode_with_precomputed_features(pair):
    target, draft = pair
    ids = _context()
    with torch.inference_mode():
        feats = extract_features(target(ids, output_hidden_states=True).hidden_states, draft.target_layer_ids)
        adapted = ttt_adapt(draft, target, ids[0], steps=3, lr=1e-2, features=feats)
    assert adapted.report.prefill_seconds is None and adapted.report.loss_after < adapted.report.loss_before
    ref = ttt_adapt(draft, target, ids, steps=3, lr=1e-2)  # its own prefill: same features
    torch.testing.assert_close(torch.tensor(adapted.report.train_losses), torch.tensor(ref.report.train_losses))


def test_on_step_sees_every_step(pair):
    target, draft = pair
    seen = []
    ttt_adapt(draft, target, _context(), steps=3, on_step=lambda s, d: seen.append((s, d.training)))
    assert seen == [(0, False), (1, False), (2, False), (3, False)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"context_ids": torch.tensor([[1, 2]])}, "too short"),
        ({"context_ids": torch.zeros(2, 10, dtype=torch.long)}, r"shape \[1, T\]"),
        ({"context_ids": torch.zeros(1, 10)}, "integer token ids"),
        ({"steps": -1}, "steps"),
        ({"lr": 0.0}, "learning rate"),
        ({"rank": 0}, "rank"),
        ({"anchors_per_step": 0}, "anchors_per_step"),
        ({"dropout": 1.0}, "dropout"),
        ({"target_modules": ("nope",)}, "cannot add LoRA"),
        ({"autocast_dtype": "fp16"}, "needs a GPU"),
        ({"features": torch.zeros(1, 5, 3)}, "features must have shape"),
    ],
)
def test_bad_input_gives_clear_errors(pair, kwargs, message):
    target, draft = pair
    args = {"context_ids": _context(), "steps": 1} | kwargs
    with pytest.raises(DraftGuideError, match=message):
        ttt_adapt(draft, target, **args)


def test_adapting_an_adapted_draft_is_refused(pair):
    target, draft = pair
    with ttt_adapt(draft, target, _context(), steps=0) as adapted:
        with pytest.raises(DraftGuideError, match="already carries TTT adapters"):
            ttt_adapt(adapted, target, _context(), steps=0)


def test_evenly_spaced_anchors():
    assert evenly_spaced_anchors(5, 10) == [1, 2, 3]
    a = evenly_spaced_anchors(1000, 64)
    assert len(a) == 64 and a[0] == 1 and a[-1] == 998 and a == sorted(set(a))
    assert evenly_spaced_anchors(2, 4) == []


def test_lazy_exports():
    import draftguide

    assert draftguide.ttt_adapt is ttt_adapt and draftguide.AdaptedDraft is AdaptedDraft
    assert draftguide.TTTReport.__name__ == "TTTReport"


# -- the diagnostic with TTT --------------------------------------------------------------------------
def _diag_tasks():
    from test_diagnostic import _task

    return [
        _task("t0", "tulip", context="The code word is tulip. Say tulip when asked."),
        _task("t1", "12 apples", "B", "b", context="Anna has 12 apples and 3 pears in her basket."),
        _task("t2", "Lyon", "A", "a", context="In this story the capital of France is Lyon, not Paris."),
    ]


def _ttt_numbers(records):
    return {
        (r["task_id"], r["token_index"]): (
            r["next"]["ttt"]["logp"],
            r["next"]["ttt"]["rank"],
            r["block"]["ttt"]["logp"],
            r["ttt_report"]["loss_after"],
        )
        for r in records
    }


def test_diagnose_ttt_does_not_leak_across_tasks():
    from conftest import char_tokenizer
    from draftguide.experiments.diagnostic import diagnose, prepare_tasks
    from draftguide.training.ttt import TTTConfig

    target, tok = tiny_target(), char_tokenizer()
    draft = tiny_draft(target, mask_token_id=3)
    base = _state(draft)
    cfg = TTTConfig(steps=4, lr=3e-3, anchors_per_step=8)
    tasks = _diag_tasks()
    fwd = diagnose(target, draft, prepare_tasks(tasks, tok), controls=(), ttt=cfg)
    rev = diagnose(target, draft, prepare_tasks(tasks[::-1], tok), controls=(), ttt=cfg)
    alone = diagnose(target, draft, prepare_tasks(tasks[2:], tok), controls=(), ttt=cfg)
    assert _ttt_numbers(fwd) == _ttt_numbers(rev)  # exactly, in any order
    assert {k: v for k, v in _ttt_numbers(fwd).items() if k[0] == "t2"} == _ttt_numbers(alone)
    assert all(torch.equal(base[k], v) for k, v in draft.state_dict().items())  # base draft untouched
    assert any(r["next"]["ttt"]["logp"] != r["next"]["draft"]["logp"] for r in fwd)  # TTT changed the readout
    for r in fwd:
        assert r["ttt_report"]["loss_after"] < r["ttt_report"]["loss_before"]


def test_diagnose_ttt_zero_steps_equals_base_draft():
    from conftest import char_tokenizer
    from draftguide.experiments.diagnostic import diagnose, prepare_tasks
    from draftguide.training.ttt import TTTConfig

    target, tok = tiny_target(), char_tokenizer()
    draft = tiny_draft(target, mask_token_id=3)
    recs = diagnose(target, draft, prepare_tasks(_diag_tasks(), tok), controls=(), ttt=TTTConfig(steps=0))
    for r in recs:
        for mode in ("next", "block"):
            assert (
                r[mode]["ttt"]["logp"] == r[mode]["draft"]["logp"]
                and r[mode]["ttt"]["rank"] == r[mode]["draft"]["rank"]
            )


def test_cli_diagnose_ttt_writes_base_and_adapted_side_by_side(tmp_path, tiny_target_dir, tiny_draft_dir, capsys):
    import json

    from draftguide.app.cli import main

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(r) + "\n" for r in _diag_tasks()))
    out = tmp_path / "out"
    argv = [
        "diagnose",
        "--target",
        str(tiny_target_dir),
        "--draft",
        str(tiny_draft_dir),
        "--tasks",
        str(tasks),
        "--out",
        str(out),
        "--no-solve",
        "--n-boot",
        "50",
        "--modes",
        "next",
        "--ttt",
        "--ttt-steps",
        "3",
        "--ttt-lr",
        "0.003",
        "--ttt-rank",
        "4",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert set(s["modes"]["next"]["all"]["mean_logp"]) == {"target", "draft", "ttt", "draft.shuffle", "draft.gauss"}
    t = s["ttt"]
    assert t["config"]["steps"] == 3 and t["config"]["rank"] == 4 and t["n_tasks"] == 3
    assert (
        t["verdict"] in {"draft_better", "equivalent", "draft_worse", "inconclusive"}
        and t["verdict_detail"]["pathway"] == "ttt"
    )
    assert set(t["verdict_detail"]["vs_controls"]) == {"shuffle", "gauss"}  # the base draft's null controls
    assert t["mean_context_loss_after"] < t["mean_context_loss_before"]
    assert len((out / "ttt.jsonl").read_text().splitlines()) == 3
    assert {json.loads(r)["pathway"] for r in (out / "tokens.jsonl").read_text().splitlines()} >= {
        "draft_next",
        "ttt_next",
    }
    report = (out / "report.md").read_text()
    assert "## Test-time training" in report and "--ttt-steps 3" in report
    assert "ttt verdict" in capsys.readouterr().out


# -- measurements: replayed acceptance, ttt-tau, the sweep, CLI errors -------------------------------
@pytest.mark.parametrize("stop_at", [None, 25])
def test_replayed_acceptance_equals_speculative_decoding(stop_at):
    from draftguide.decode.speculative import greedy_generate
    from draftguide.experiments.ttt_measure import replay_acceptance

    target, draft, prompt = mixed_acceptance_pair()
    P, n = prompt.shape[1], 60
    full, _ = greedy_generate(target, prompt, n)
    stop = [int(full[0, P + stop_at])] if stop_at is not None else None
    with ttt_adapt(draft, target, prompt, steps=3, lr=1e-2) as adapted:
        for d in (draft, adapted):
            seq, st = speculative_generate(target, d, prompt, n, stop_token_ids=stop)
            with torch.no_grad():
                feats = extract_features(target(seq, output_hidden_states=True).hidden_states, d.target_layer_ids)
            assert replay_acceptance(d, target, feats, seq, P, P + n) == st.acceptance_lengths
            assert sum(st.acceptance_lengths) == seq.shape[1] - P - 1  # the first token comes from the prefill


def test_tau_summary_pools_steps_and_bootstraps_deltas():
    from draftguide.experiments.ttt_measure import tau_summary

    rep = {"loss_before": 2.0, "loss_after": 1.0, "seconds": 1.0, "prefill_ratio": 4.0}
    rows = [
        {
            "context_tokens": 10,
            "acceptance_base": [1, 1],
            "acceptance_ttt": [2],
            "delta_tau": 1.0,
            "identical_output": True,
            "ttt": rep,
        },
        {
            "context_tokens": 30,
            "acceptance_base": [1, 3],
            "acceptance_ttt": [2, 2],
            "delta_tau": 0.0,
            "identical_output": True,
            "ttt": rep,
        },
    ]
    s = tau_summary(rows)
    assert s["tau_base"] == 6 / 4 and s["tau_ttt"] == 6 / 3 and s["delta_tau_mean"] == 0.5
    assert s["delta_tau_ci95"][0] <= 0.5 <= s["delta_tau_ci95"][1] and s["contexts_improved"] == 1
    assert s["mean_context_tokens"] == 20 and s["identical_output"]


def test_cli_ttt_tau(tmp_path, tiny_target_dir, tiny_draft_dir, capsys):
    import json

    from draftguide.app.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "prompt": f"count: {' '.join(map(str, range(i, i + 12)))}"}) + "\n"
            for i in range(3)
        )
    )
    out = tmp_path / "tau"
    argv = [
        "ttt-tau",
        "--target",
        str(tiny_target_dir),
        "--draft",
        str(tiny_draft_dir),
        "--sets",
        f"suite-doc,{prompts}",
        "--limit",
        "2",
        "--context-tokens",
        "40",
        "--max-new-tokens",
        "12",
        "--ttt-steps",
        "3",
        "--ttt-lr",
        "0.01",
        "--out",
        str(out),
    ]
    assert main(argv) == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert set(s["sets"]) == {"suite-doc", "p"} and s["all"]["n_contexts"] == 4
    assert s["command"] == "draftguide " + " ".join(argv)  # the exact, reproducing command (target included)
    assert s["all"]["identical_output"]  # greedy: the same continuation before and after TTT
    rows = [json.loads(r) for r in (out / "results.jsonl").read_text().splitlines()]
    assert all(r["ttt"]["steps"] == 3 and r["ttt"]["loss_after"] < r["ttt"]["loss_before"] for r in rows)
    assert [r["context_tokens"] for r in rows if r["set"] == "suite-doc"] == [40, 40]
    assert "delta (95% CI)" in capsys.readouterr().out


def test_cli_sweep_ttt(tmp_path, tiny_target_dir, tiny_draft_dir, capsys):
    import json

    from draftguide.app.cli import main

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(r) + "\n" for r in _diag_tasks()))
    out = tmp_path / "sweep"
    argv = [
        "sweep",
        "ttt",
        "--target",
        str(tiny_target_dir),
        "--draft",
        str(tiny_draft_dir),
        "--tasks",
        str(tasks),
        "--steps",
        "0,2,4",
        "--lr",
        "0.003",
        "--rank",
        "2,4",
        "--max-new-tokens",
        "10",
        "--out",
        str(out),
    ]
    assert main(argv) == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert len(s["table"]) == 6 and all(r["n_tasks"] == 3 for r in s["table"])
    by = {(r["rank"], r["steps"]): r for r in s["table"]}
    assert by[(2, 4)]["context_loss"] < by[(2, 0)]["context_loss"]
    assert s["best"] in s["table"]
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG" and "**best**" in (out / "report.md").read_text()
    assert "<- best" in capsys.readouterr().out
    assert len((out / "points.jsonl").read_text().splitlines()) == 3 * 6
    assert s["best_rule"].startswith("highest tau")  # a speculative draft: chosen by tau


def test_cli_sweep_ttt_with_an_aligned_readout_chooses_by_log_prob_gap(tmp_path, tiny_target_dir, tiny_readout_dir):
    import json

    from draftguide.app.cli import main

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(r) + "\n" for r in _diag_tasks()))
    out = tmp_path / "sweep"
    argv = ["sweep", "ttt", "--target", str(tiny_target_dir), "--draft", str(tiny_readout_dir), "--tasks"]
    argv += [str(tasks), "--steps", "0,2", "--lr", "0.003", "--rank", "2", "--max-new-tokens", "6", "--out", str(out)]
    assert main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert "cannot speculate" in s["best_rule"] and "cannot speculate" in s["tau_method"]
    assert s["best"] == max(s["table"], key=lambda r: (r["logp_gap"], r["tau"]))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["diagnose", "--ttt", "--ttt-steps=-1"], "steps"),
        (["diagnose", "--ttt", "--ttt-rank", "0"], "rank"),
        (["diagnose", "--ttt", "--ttt-lr", "0"], "learning rate"),
        (["diagnose", "--ttt", "--ttt-modules", ","], "at least one target module"),
        (["ttt-tau", "--ttt-anchors", "0"], "anchors_per_step"),
        (["ttt-tau", "--sets", ""], "--sets is empty"),
        (["ttt-tau", "--max-new-tokens", "1"], "--max-new-tokens"),
        (["sweep", "ttt", "--steps", "0,x"], "--steps"),
        (["sweep", "ttt", "--steps=-4,4"], "must be >= 0"),
        (["sweep", "ttt", "--lr", "0.1,-1"], "learning rate"),
        (["sweep", "ttt", "--rank", "0"], "rank"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    from draftguide.app.cli import main

    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("draftguide: error:") and err.count("\n") == 1 and message in err


def test_unknown_context_set_is_a_clear_error():
    from conftest import char_tokenizer
    from draftguide.experiments.ttt_measure import load_contexts

    with pytest.raises(DraftGuideError, match="unknown context set"):
        load_contexts("nope", char_tokenizer())


@pytest.mark.slow
def test_default_pair_end_to_end():
    """SmolLM2-135M + the shipped draft: zero-step TTT changes nothing, 8 steps lower the context loss and
    speculative decoding with the adapted draft stays lossless."""
    from draftguide.experiments.tasks import load_builtin_tasks
    from draftguide.modeling.draft_io import resolve_draft
    from draftguide.modeling.prompts import encode_prompt, stop_token_ids
    from draftguide.modeling.targets import load_target

    target, tok = load_target("smollm2-135m")
    draft = resolve_draft(None, target, tok, target_name="smollm2-135m")
    ids, stop = encode_prompt(tok, load_builtin_tasks()[0]), stop_token_ids(tok, target)
    base_tokens, base = speculative_generate(target, draft, ids, 24, stop_token_ids=stop)
    with ttt_adapt(draft, target, ids, steps=0) as adapted:
        tokens, st = speculative_generate(target, adapted, ids, 24, stop_token_ids=stop)
    assert torch.equal(tokens, base_tokens) and st.acceptance_lengths == base.acceptance_lengths
    with ttt_adapt(draft, target, ids, steps=8) as adapted:
        tokens, st = speculative_generate(target, adapted, ids, 24, stop_token_ids=stop)
        assert adapted.report.loss_after < adapted.report.loss_before
    assert torch.equal(tokens, base_tokens)


def test_sweep_best_config_of_an_aligned_readout_is_chosen_by_log_prob_gap():
    from draftguide.experiments.ttt_measure import sweep_summary

    def row(task, steps, tau, gap):
        return {
            "task_id": task,
            "lr": 1e-3,
            "rank": 4,
            "steps": steps,
            "acceptance": [tau],
            "tau": tau,
            "logp_gap": gap,
        }

    rows = [row(t, 0, 2, -1.0) | {"context_loss": 3.0} for t in "ab"]
    rows += [row(t, 4, 3, -2.0) | {"context_loss": 2.0} for t in "ab"]  # replayed tau up, gold log p down
    assert sweep_summary(rows, n_boot=100)["best"]["steps"] == 4
    s = sweep_summary(rows, n_boot=100, by_tau=False)
    assert s["best"]["steps"] == 0 and "cannot speculate" in s["best_rule"]
