"""Tiny random targets and drafts: logic checks that run in seconds on a CPU."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from draftguide.modeling.draft import DFlashDraft

VOCAB = 96


def tiny_target(arch: str = "qwen3", seed: int = 0, vocab: int = VOCAB, layers: int = 6):
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )
    cfg = Qwen3Config(**common) if arch == "qwen3" else LlamaConfig(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # random init with std 0.02 gives near-uniform logits; sharpen so greedy paths are not all ties
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.eval().requires_grad_(False)


def tiny_draft(target, seed: int = 1, layers: int = 2, block_size: int = 8, mask_token_id: int = VOCAB - 1):
    return (
        DFlashDraft.for_target(
            target,
            num_layers=layers,
            block_size=block_size,
            mask_token_id=mask_token_id,
            target_layer_ids=[1, 3, 4],
            seed=seed,
        )
        .eval()
        .requires_grad_(False)
    )


@pytest.fixture(scope="session")
def qwen3_pair():
    t = tiny_target("qwen3")
    return t, tiny_draft(t)


@pytest.fixture(scope="session")
def llama_pair():
    t = tiny_target("llama", seed=3)
    return t, tiny_draft(t, seed=4)


@functools.lru_cache(maxsize=None)
def mixed_acceptance_pair(block_size: int = 8):
    """A tiny (vocab 12) target/draft pair whose greedy speculation accepts a mix of 1..many tokens,
    so acceptance-length comparisons are not trivially all ones. Searches a few seeds, deterministically."""
    for seed in range(20):
        t = tiny_target(vocab=12, seed=seed)
        d = tiny_draft(t, mask_token_id=11, seed=seed + 10, block_size=block_size)
        from draftguide.decode.speculative import speculative_generate

        ids = torch.randint(0, 11, (1, 10), generator=torch.Generator().manual_seed(seed))
        _, st = speculative_generate(t, d, ids, 60)
        if max(st.acceptance_lengths) >= 3:
            return t, d, ids
    raise RuntimeError("no tiny pair with mixed acceptance found")


def char_tokenizer(vocab_size: int = VOCAB):
    """A character-level fast tokenizer with a chat template, for CLI tests on tiny local targets."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<mask>"]
    chars = [chr(c) for c in range(32, 32 + vocab_size - len(specials))]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return tok


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory):
    """A saved tiny Qwen3 target + char tokenizer, loadable with `--target DIR`."""
    path = tmp_path_factory.mktemp("tiny-target")
    tiny_target("qwen3").save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_draft_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-draft")
    tiny_draft(tiny_target("qwen3"), mask_token_id=3).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_readout_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-readout")
    d = DFlashDraft.for_target(  # an aligned readout (context <= anchor)
        tiny_target("qwen3"),
        num_layers=2,
        block_size=8,
        mask_token_id=3,
        target_layer_ids=[1, 3, 4],
        seed=5,
        context_includes_anchor=True,
    )
    d.save_pretrained(path)
    return path
