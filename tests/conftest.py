"""Tiny random targets and drafts: logic checks that run in seconds on a CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from draftguide.draft import DFlashDraft

VOCAB = 96


def tiny_target(arch: str = "qwen3", seed: int = 0, vocab: int = VOCAB, layers: int = 6):
    common = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        tie_word_embeddings=False, rms_norm_eps=1e-6,
    )
    cfg = Qwen3Config(**common) if arch == "qwen3" else LlamaConfig(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # random init with std 0.02 gives near-uniform logits; sharpen so greedy paths are not all ties
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.eval().requires_grad_(False)


def tiny_draft(target, seed: int = 1, layers: int = 2, block_size: int = 8, mask_token_id: int = VOCAB - 1):
    return DFlashDraft.for_target(
        target, num_layers=layers, block_size=block_size, mask_token_id=mask_token_id,
        target_layer_ids=[1, 3, 4], seed=seed,
    ).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def qwen3_pair():
    t = tiny_target("qwen3")
    return t, tiny_draft(t)


@pytest.fixture(scope="session")
def llama_pair():
    t = tiny_target("llama", seed=3)
    return t, tiny_draft(t, seed=4)
