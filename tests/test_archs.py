"""Other target architectures: a tiny random Qwen3-MoE, Qwen2 and Llama target, each with a draft built for it,
through every command (speculate, diagnose, TTT, guided, fidelity, train-draft) and the new analyses (probe,
ablate-layers), plus the exactness checks the commands rely on (lossless speculation, beta 0 = greedy)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3MoeConfig

from conftest import char_tokenizer, tiny_draft
from draftguide.app.cli import main

VOCAB = 96
ARCHS = ("qwen3_moe", "qwen2", "llama")


def arch_target(arch: str, seed: int = 0):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )
    if arch == "qwen3_moe":  # every layer sparse: 4 experts, 2 per token
        cfg = Qwen3MoeConfig(
            **common,
            head_dim=16,
            moe_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
        )
    elif arch == "qwen2":
        cfg = Qwen2Config(**common)
    else:
        cfg = LlamaConfig(**common, head_dim=16)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # sharper logits: greedy paths are not ties
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module", params=ARCHS)
def arch_dirs(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    target = arch_target(request.param)
    target.save_pretrained(root / "target")
    char_tokenizer().save_pretrained(root / "target")
    tiny_draft(target, mask_token_id=3, block_size=4).save_pretrained(root / "draft")
    return request.param, root


def test_moe_target_is_sparse():
    t = arch_target("qwen3_moe")
    assert type(t).__name__ == "Qwen3MoeForCausalLM"
    assert any("experts" in n for n, _ in t.named_modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_speculation_is_lossless_and_beta0_is_greedy(arch):
    from draftguide.decode.guided import guided_generate
    from draftguide.decode.speculative import greedy_generate, speculative_generate

    t = arch_target(arch, seed=1)
    d = tiny_draft(t, mask_token_id=VOCAB - 1, block_size=4)
    ids = torch.randint(0, VOCAB - 1, (1, 12), generator=torch.Generator().manual_seed(0))
    ref, _ = greedy_generate(t, ids, 20, [])
    spec, st = speculative_generate(t, d, ids, 20)
    assert torch.equal(spec, ref) and spec.shape[1] == 32 and st.acceptance_lengths
    guided, _ = guided_generate(t, d, ids, beta=0.0, max_new_tokens=20, stop_token_ids=[])
    assert torch.equal(guided, ref)


def _run(argv):
    assert main(argv) == 0, argv


def test_every_command(arch_dirs, tmp_path):
    arch, root = arch_dirs
    T, D = str(root / "target"), str(root / "draft")
    # speculate
    _run(
        [
            "speculate",
            "--target",
            T,
            "--draft",
            D,
            "--prompts",
            "builtin",
            "--limit",
            "2",
            "--max-new-tokens",
            "8",
            "--out",
            str(tmp_path / "spec"),
        ]
    )
    s = json.loads((tmp_path / "spec" / "summary.json").read_text())
    assert s["lossless"] is True and s["n_prompts"] == 2
    # make-data + train-draft (a speculative draft and an aligned readout)
    _run(
        [
            "make-data",
            "--target",
            T,
            "--prompts",
            str(_prompts(tmp_path)),
            "--max-new-tokens",
            "12",
            "--out",
            str(tmp_path / "data"),
        ]
    )
    _run(
        [
            "train-draft",
            "--target",
            T,
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "train"),
            "--steps",
            "2",
            "--block-size",
            "4",
            "--draft-layers",
            "1",
            "--target-layer-ids",
            "1",
            "4",
            "--batch-size",
            "2",
            "--anchors-per-seq",
            "4",
            "--vocab-subset",
            "0",
            "--mask-token-id",
            "3",
            "--log-every",
            "1",
        ]
    )
    assert (tmp_path / "train" / "draft" / "model.safetensors").is_file()
    _run(
        [
            "train-draft",
            "--target",
            T,
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "aligned"),
            "--steps",
            "2",
            "--init-from",
            D,
            "--context-includes-anchor",
            "--loss",
            "mix",
            "--batch-size",
            "2",
            "--anchors-per-seq",
            "4",
            "--vocab-subset",
            "0",
            "--log-every",
            "1",
        ]
    )
    # fidelity of both
    _run(
        [
            "fidelity",
            "--target",
            T,
            "--draft",
            f"{D},{tmp_path / 'aligned' / 'draft'}",
            "--data",
            str(tmp_path / "data"),
            "--n-boot",
            "50",
            "--out",
            str(tmp_path / "fid"),
        ]
    )
    f = json.loads((tmp_path / "fid" / "summary.json").read_text())
    assert len(f["readouts"]) == 2 and all("shuffled" in r["controls"] for r in f["readouts"].values())
    # diagnose with TTT
    _run(
        [
            "diagnose",
            "--target",
            T,
            "--draft",
            D,
            "--limit",
            "3",
            "--no-solve",
            "--ttt",
            "--ttt-steps",
            "2",
            "--ttt-anchors",
            "4",
            "--n-boot",
            "50",
            "--out",
            str(tmp_path / "diag"),
        ]
    )
    d = json.loads((tmp_path / "diag" / "summary.json").read_text())
    assert (
        d["n_tasks"] == 3
        and "ttt" in d
        and d["verdict"] in ("inconclusive", "equivalent", "draft_better", "draft_worse")
    )
    # TTT's acceptance-length measurement
    _run(
        [
            "ttt-tau",
            "--target",
            T,
            "--draft",
            D,
            "--sets",
            "suite",
            "--limit",
            "2",
            "--max-new-tokens",
            "6",
            "--ttt-steps",
            "2",
            "--ttt-anchors",
            "4",
            "--out",
            str(tmp_path / "ttt"),
        ]
    )
    assert (tmp_path / "ttt" / "summary.json").is_file()
    # guided decoding, through eval (plain and with TTT) and generate
    for name, extra in (("guided", []), ("guided-ttt", ["--ttt", "--ttt-steps", "1", "--ttt-anchors", "4"])):
        _run(
            [
                "eval",
                "--target",
                T,
                "--draft",
                D,
                "--method",
                "guided",
                "--beta",
                "0.5",
                "--limit",
                "2",
                "--max-new-tokens",
                "6",
                "--judge",
                "rules",
                "--out",
                str(tmp_path / name),
                *extra,
            ]
        )
        rows = [json.loads(x) for x in (tmp_path / name / "results.jsonl").read_text().splitlines()]
        assert [r["status"] for r in rows] == ["ok", "ok"] and all("flips" in r for r in rows)
    _run(["generate", "--target", T, "--draft", D, "--prompt", "hi", "--beta", "0.5", "--max-new-tokens", "4"])
    # the analyses of issue 20
    _run(
        [
            "probe",
            "--target",
            T,
            "--draft",
            D,
            "--limit",
            "8",
            "--folds",
            "2",
            "--shuffles",
            "1",
            "--n-boot",
            "50",
            "--out",
            str(tmp_path / "probe"),
        ]
    )
    p = json.loads((tmp_path / "probe" / "summary.json").read_text())
    assert {"target_last", "draft", "layer_1"} <= set(p["representations"])


def test_ablate_layers_on_moe(tmp_path):
    root = tmp_path
    target = arch_target("qwen3_moe")
    target.save_pretrained(root / "target")
    char_tokenizer().save_pretrained(root / "target")
    T = str(root / "target")
    _run(
        [
            "make-data",
            "--target",
            T,
            "--prompts",
            str(_prompts(tmp_path)),
            "--max-new-tokens",
            "10",
            "--out",
            str(root / "data"),
        ]
    )
    _run(
        [
            "ablate-layers",
            "--target",
            T,
            "--data",
            str(root / "data"),
            "--layer-sets",
            "1,4;5",
            "--steps",
            "2",
            "--block-size",
            "4",
            "--draft-layers",
            "1",
            "--batch-size",
            "2",
            "--anchors-per-seq",
            "4",
            "--vocab-subset",
            "0",
            "--mask-token-id",
            "3",
            "--limit",
            "3",
            "--no-solve",
            "--fidelity-limit",
            "2",
            "--fidelity-max-new-tokens",
            "4",
            "--n-boot",
            "50",
            "--device",
            "cpu",
            "--out",
            str(root / "abl"),
        ]
    )
    s = json.loads((root / "abl" / "summary.json").read_text())
    assert [r["steps"] for r in s["rows"]] == [2, 2] and all("fidelity" in r and "diagnostic" in r for r in s["rows"])


def _prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    if not path.is_file():
        path.write_text(
            "".join(
                json.dumps({"id": f"p{i}", "prompt": p}) + "\n"
                for i, p in enumerate(["hello world", "abc def", "the cat sat", "tiny model"])
            )
        )
    return path


def test_memory_estimate_counts_only_the_active_experts():
    from draftguide.experiments.profiling import expert_fraction, memory_estimate, weight_bytes_per_token

    t = arch_target("qwen3_moe")
    assert expert_fraction(t) == 0.5 and expert_fraction(arch_target("llama")) == 1.0
    params = dict(t.named_parameters())
    experts = sum(p.numel() for n, p in params.items() if ".experts." in n) * 4
    total = sum(p.numel() for p in params.values()) * 4
    emb = t.get_input_embeddings().weight
    assert experts > 0
    assert weight_bytes_per_token(t) == total - experts // 2 - (emb.numel() - emb.shape[1]) * 4
    d = tiny_draft(t, mask_token_id=3)
    m = memory_estimate(t.config, dtype=torch.float32, context_tokens=100, draft_config=d.config)
    assert m["weight_bytes"] == total and m["weight_bytes_read_per_token"] == weight_bytes_per_token(t)
    assert m["kv_bytes_per_token"] == 2 * 6 * 2 * 16 * 4 and m["kv_bytes_at_context"] == 100 * m["kv_bytes_per_token"]
    assert (
        m["draft_weight_bytes"] == sum(p.numel() for p in d.parameters()) * 4
        and m["feature_bytes_per_token"] == 3 * 64 * 4
    )


def test_profile_memory_only(arch_dirs, tmp_path, capsys):
    arch, root = arch_dirs
    _run(
        [
            "profile",
            "--target",
            str(root / "target"),
            "--draft",
            str(root / "draft"),
            "--memory-only",
            "--context-lens",
            "64,1000",
            "--out",
            str(tmp_path / "mem"),
        ]
    )
    m = json.loads((tmp_path / "mem" / "memory.json").read_text())
    assert m["context_tokens"] == 1000 and m["dtype"] == "float32" and m["draft_weight_bytes"] > 0
    assert (m["expert_fraction"] == 0.5) == (arch == "qwen3_moe")
    assert m["weight_bytes_read_per_token"] < m["weight_bytes"] and "KV cache" in capsys.readouterr().out
