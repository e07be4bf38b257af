"""FR-Spec proposal head and the device default of verification: output never changes."""

import torch

from conftest import mixed_acceptance_pair
from draftguide.decode.speculative import (
    SubsetHead,
    default_verify_len,
    greedy_generate,
    load_draft_vocab,
    save_vocab_ranking,
    speculative_generate,
)


def test_subset_head_scores_only_the_subset():
    target, draft, ids = mixed_acceptance_pair()
    head = SubsetHead(draft, target, torch.tensor([5, 1, 7]))
    h = torch.randn(1, 3, target.config.hidden_size)
    out = head(h)
    full = draft.logits(h, target)
    assert out.shape == full.shape
    torch.testing.assert_close(out[..., [1, 5, 7]], full[..., [1, 5, 7]].float())
    keep = torch.zeros(out.shape[-1], dtype=torch.bool)
    keep[[1, 5, 7]] = True
    assert torch.isinf(out[..., ~keep]).all()


def test_frspec_leaves_greedy_output_identical():
    target, draft, ids = mixed_acceptance_pair()
    ref, _ = greedy_generate(target, ids, 40)
    full, st_full = speculative_generate(target, draft, ids, 40)
    for subset in ([0, 1, 2, 3, 4, 5], [2, 9], list(range(12))):
        out, st = speculative_generate(
            target, draft, ids, 40, draft_head=SubsetHead(draft, target, torch.tensor(subset))
        )
        assert out.tolist() == ref.tolist() == full.tolist()
        if len(subset) == 12:
            assert st.acceptance_lengths == st_full.acceptance_lengths  # the whole vocabulary: same proposals
    narrow = speculative_generate(target, draft, ids, 40, draft_head=SubsetHead(draft, target, torch.tensor([2, 9])))
    proposed_outside = [t for t in ref[0, ids.shape[1] :].tolist() if t not in (2, 9)]
    assert proposed_outside and narrow[0].tolist() == ref.tolist()  # tokens the draft could never propose still come


def test_frspec_sampling_stays_a_valid_rejection_sampler():
    """At temperature > 0, q is zero outside the subset, so the proposals are always in it and generation runs."""
    target, draft, ids = mixed_acceptance_pair()
    g = torch.Generator().manual_seed(0)
    out, st = speculative_generate(
        target,
        draft,
        ids,
        30,
        temperature=1.0,
        generator=g,
        draft_head=SubsetHead(draft, target, torch.tensor([0, 1, 2, 3])),
    )
    assert out.shape[1] == ids.shape[1] + 30 and st.tau >= 1


def test_vocab_ranking_round_trip(tmp_path):
    counts = torch.tensor([5, 0, 9, 9, 1])
    save_vocab_ranking(tmp_path, counts)
    assert load_draft_vocab(tmp_path, 3).tolist() == [2, 3, 0]  # by falling count, ties by id


def test_default_verification_follows_the_device():
    assert default_verify_len("cpu") == "auto"
    assert default_verify_len(torch.device("cuda", 0)) == "full"
    assert default_verify_len("cpu", temperature=0.7) == "full"  # seeded sampling must reproduce


def test_default_draft_head_and_dtype_follow_the_device(tmp_path, monkeypatch):
    from draftguide.decode import speculative

    save_vocab_ranking(tmp_path, torch.arange(20))
    assert speculative.default_draft_vocab("cpu", tmp_path) is None  # 20 tokens: not above the 8K head
    monkeypatch.setattr(speculative, "CPU_DRAFT_VOCAB", 8)
    assert speculative.default_draft_vocab("cpu", tmp_path) == 8
    assert speculative.default_draft_vocab(torch.device("cuda", 0), tmp_path) is None
    assert speculative.default_draft_vocab("cpu", tmp_path / "no-ranking") is None
    assert speculative.default_draft_dtype("cpu", torch.float32) == torch.bfloat16
    assert speculative.default_draft_dtype("cuda", torch.float32) == torch.float32
    assert speculative.default_draft_dtype("cpu", torch.float16) == torch.float16


def test_speculate_cli_uses_the_cpu_defaults_and_flags_override_them(
    tmp_path, tiny_target_dir, tiny_draft_dir, monkeypatch
):
    """Plain `speculate` on a CPU: the FR-Spec head and a bf16 draft (the fast configuration measured in
    benchmarks/bench_frspec.py), recorded in the summary, output still identical to greedy;
    `--draft-vocab 0 --draft-dtype float32` is the full fp32 head."""
    import json
    import shutil
    from pathlib import Path

    from draftguide.app.cli import main
    from draftguide.decode import speculative

    draft = tmp_path / "draft"
    shutil.copytree(tiny_draft_dir, draft)
    vocab = json.loads((Path(tiny_target_dir) / "config.json").read_text())["vocab_size"]
    save_vocab_ranking(draft, torch.arange(vocab).flip(0))
    monkeypatch.setattr(speculative, "CPU_DRAFT_VOCAB", vocab // 2)
    common = ["speculate", "--target", str(tiny_target_dir), "--draft", str(draft), "--max-new-tokens", "10"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert s["draft_vocab"] == vocab // 2 and s["draft_dtype"] == "bfloat16" and s["lossless"] is True
    assert main([*common, "--out", str(tmp_path / "b"), "--draft-vocab", "0", "--draft-dtype", "float32"]) == 0
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s["draft_vocab"] is None and s["draft_dtype"] == "float32"
