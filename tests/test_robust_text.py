"""Issue 17, kind 3: text cut inside a multi-byte character. Non-streamed and streamed text are the same string
and hold no U+FFFD from the cut (library, server, eval and speculate text)."""

import json

import pytest

from conftest import tiny_draft, tiny_target
from draftguide.app.pipeline import DraftGuide, TextStream, decode_text

SPECIALS = ["<unk>", "<s>", "</s>", "<mask>"]
EMOJI = "\U0001f600"  # 4 UTF-8 bytes


def byte_tokenizer():
    """One token per byte (GPT-2 byte-level alphabet), ids 4..259: any cut can fall inside a character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from draftguide.app.pipeline import _byte_decoder

    enc = {b: c for c, b in _byte_decoder().items()}
    vocab = {t: i for i, t in enumerate(SPECIALS + [enc[b] for b in range(256)])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    return tok


def ids_of(text: str) -> list[int]:
    return [b + len(SPECIALS) for b in text.encode("utf-8")]


REPLY = "ok " + EMOJI + EMOJI + " done"


class Scripted(DraftGuide):
    """A model that writes REPLY token by token (one byte each), whatever the prompt."""

    def _decode(self, method, ids, n, beta, speculative, temperature, top_p, top_k, stop_ids, seed, on_token, options):
        for t in ids_of(REPLY)[:n]:
            on_token([t])
        return None, None


@pytest.fixture(scope="module")
def dg():
    t = tiny_target(vocab=264)
    return Scripted(t, byte_tokenizer(), tiny_draft(t, mask_token_id=3), name="bytes")


@pytest.mark.parametrize("n", range(1, len(ids_of(REPLY)) + 1))
def test_stream_equals_text_at_every_cut(dg, n):
    g = dg.generate("x", max_new_tokens=n)
    pieces = list(dg.generate("x", max_new_tokens=n, stream=True))
    full = REPLY.encode()[:n].decode("utf-8", errors="ignore")  # what is complete after n bytes
    assert g.text == "".join(pieces) == full
    assert "\ufffd" not in g.text


def test_decode_text_and_textstream():
    tok = byte_tokenizer()
    cut = ids_of("a" + EMOJI)[:3]
    assert tok.decode(cut).endswith("\ufffd")  # the raw decode shows the cut
    assert decode_text(tok, cut) == "a"
    s = TextStream(tok, [])
    got = "".join(s.push([i]) for i in ids_of("x" + EMOJI + "y")) + s.flush()
    assert got == s.text == "x" + EMOJI + "y"


def test_server_stream_and_plain_agree(dg):
    from openai import OpenAI

    from draftguide.app.server import create_app
    from test_robust_sampling import _post
    from test_server import running

    with running(create_app(dg)) as url:
        c = OpenAI(base_url=url, api_key="none", timeout=30, max_retries=0)
        for n in (4, 5, 6, 8, 9):  # cut inside the first and the second emoji
            msg = [{"role": "user", "content": "emoji please"}]
            plain = c.chat.completions.create(model="bytes", messages=msg, max_tokens=n).choices[0].message.content
            streamed = "".join(
                ch.choices[0].delta.content or ""
                for ch in c.chat.completions.create(model="bytes", messages=msg, max_tokens=n, stream=True)
            )
            assert plain == streamed and "\ufffd" not in plain, n
        status, r = _post(
            url, json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 5, "logprobs": True})
        )
        assert status == 200
        lp = r["choices"][0]["logprobs"]["content"]
        assert bytes(b for e in lp for b in e["bytes"]) == REPLY.encode()[:5]  # bytes hold what the cut text does not


def test_eval_response_has_no_replacement_char(tmp_path):
    from draftguide.experiments.evaluate import METHODS, evaluate_task

    tok = byte_tokenizer()
    target = tiny_target(vocab=264)
    METHODS["scripted-bytes"] = lambda t, k, ids, n, stop, **o: ids_of(REPLY)[:n]
    try:
        task = {
            "messages": [{"role": "user", "content": "x"}],
            "metadata": {"task_id": "a"},
            "checks": [{"type": "contains", "value": "ok"}],
            "_line": 1,
        }
        rec = evaluate_task(target, tok, task, "scripted-bytes", 5, [], "rules")
        assert rec["response"] == "ok" and "\ufffd" not in json.dumps(rec, ensure_ascii=False)
    finally:
        del METHODS["scripted-bytes"]
