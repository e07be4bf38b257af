"""`DraftGuide`: a thin layer over the library functions, and the README example, executed."""

import re
from pathlib import Path

import pytest
import torch

from conftest import char_tokenizer, tiny_draft, tiny_target
from draftguide import DraftGuide, DraftGuideError
from draftguide.app.pipeline import TextStream
from draftguide.decode.speculative import greedy_generate, speculative_generate

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def dg():
    t = tiny_target()
    return DraftGuide(t, char_tokenizer(), tiny_draft(t, mask_token_id=3), name="tiny")


def test_generate_equals_the_library_functions(dg):
    ids = dg.encode("hello")
    ref, _ = greedy_generate(dg.target, ids, 12)
    g = dg.generate("hello", max_new_tokens=12)
    assert g.tokens == ref[0, ids.shape[1] :].tolist() and g.method == "greedy" and g.finish_reason == "length"
    s = dg.generate("hello", max_new_tokens=12, speculative=True)
    sref, st = speculative_generate(dg.target, dg.draft, ids, 12)
    assert s.tokens == g.tokens and s.method == "speculative" and s.stats["tau"] == st.tau
    assert str(s) == s.text == dg.tokenizer.decode(s.tokens, skip_special_tokens=True)


def test_sampling_is_seeded(dg):
    a = dg.generate("hi", max_new_tokens=10, method="speculative", temperature=1.0, seed=3)
    b = dg.generate("hi", max_new_tokens=10, method="speculative", temperature=1.0, seed=3)
    assert a.tokens == b.tokens


def test_stream_pieces_join_to_the_text(dg):
    pieces = list(dg.generate("hello", max_new_tokens=12, stream=True))
    assert len(pieces) > 1 and "".join(pieces) == dg.generate("hello", max_new_tokens=12).text


def test_stream_closed_early_stops_decoding(dg):
    calls = []
    hook = dg.target.register_forward_hook(lambda *a: calls.append(1))
    try:
        it = dg.generate("hello", max_new_tokens=400, stream=True)
        next(it)
        it.close()  # the worker thread gets Cancelled at its next token and releases the lock
        assert dg._lock.acquire(timeout=10)
        dg._lock.release()
    finally:
        hook.remove()
    assert len(calls) < 100  # decoding stopped long before its 400 tokens


def test_prompt_forms(dg):
    msgs = [{"role": "user", "content": "hello"}]
    assert torch.equal(dg.encode("hello"), dg.encode(msgs)) and torch.equal(
        dg.encode({"messages": msgs}), dg.encode(msgs)
    )
    raw = dg.encode({"prompt": "hello"})
    assert raw.shape[1] == 5 and torch.equal(dg.encode(raw), raw)
    with pytest.raises(DraftGuideError):
        dg.encode(3)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(method="nope"), "unknown method"),
        (dict(beta=0.5, method="speculative"), "needs method 'guided'"),
        (dict(beta=1.5, method="guided"), "beta must be"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1), "temperature"),
    ],
)
def test_bad_options(dg, kw, msg):
    with pytest.raises(DraftGuideError, match=msg):
        dg.generate("hello", **kw)


class _Chars:
    """Tokenizer stand-in: id = code point, 0 = EOS; a lone 0xFFFF decodes to an incomplete character."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join("\ufffd" if i == 0xFFFF else chr(i) for i in ids if i)


def _ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_text_stream_holds_back_what_may_become_a_stop_string():
    ts = TextStream(_Chars(), [0], ["abc"])
    assert [ts.push([i]) for i in _ids("xyab")] == ["x", "y", "", ""]
    assert ts.push(_ids("c")) == "" and ts.stop_hit and ts.text == "xy"
    ts = TextStream(_Chars(), [0], ["abc"])
    assert "".join(ts.push([i]) for i in _ids("xabd")) == "xabd" and not ts.stop_hit  # released once it cannot match


def test_text_stream_stops_at_the_stop_token_and_waits_for_whole_characters():
    ts = TextStream(_Chars(), [0])
    assert ts.push(_ids("ab") + [0] + _ids("c")) == "ab" and ts.stop_hit and ts.ids == [*_ids("ab"), 0]
    ts = TextStream(_Chars(), [0])
    assert ts.push(_ids("a") + [0xFFFF]) == "a" and ts.flush() == ""


def test_diagnose_writes_the_run_folder(dg, tmp_path):
    tasks = [
        {
            "messages": [{"role": "user", "content": "Say tulip."}],
            "reference_answer": "tulip",
            "metadata": {"task_id": "t0"},
        },
        {
            "messages": [{"role": "user", "content": "Say rose."}],
            "reference_answer": "rose",
            "metadata": {"task_id": "t1"},
        },
    ]
    s = dg.diagnose(tasks, out=tmp_path / "d", controls=False, n_boot=20, progress=False)
    assert s["n_tasks"] == 2 and s["n_tokens"] == len("tulip") + len("rose")
    assert (tmp_path / "d" / "report.md").is_file() and "DraftGuide.from_pretrained('tiny')" in s["command"]
    s = dg.diagnose(
        tasks, out=tmp_path / "t", controls=False, ttt={"steps": 1, "anchors_per_step": 2}, n_boot=20, progress=False
    )
    assert "ttt" in s["modes"]["next"]["all"]["mean_logp"] and (tmp_path / "t" / "ttt.jsonl").is_file()


def _readme_example() -> str:
    text = README.read_text()
    m = re.search(r"<!-- readme-example -->\n```python\n(.*?)```", text, re.S)
    assert m, "README example block not found"
    return m.group(1)


def test_readme_example_on_tiny_models(tiny_target_dir, tiny_draft_dir, tmp_path, monkeypatch):
    code = _readme_example().replace(
        'DraftGuide.from_pretrained("smollm2-135m")',
        f"DraftGuide.from_pretrained({str(tiny_target_dir)!r}, draft={str(tiny_draft_dir)!r})",
    )
    assert str(tiny_target_dir) in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "runs" / "notebook-diagnose" / "summary.json").is_file()


@pytest.mark.slow
def test_readme_example_on_the_default_pair(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(_readme_example(), "README.md", "exec"), {})
    assert (tmp_path / "runs" / "notebook-diagnose" / "summary.json").is_file()


def test_guided_through_the_pipeline(dg):
    greedy = dg.generate("hello", max_new_tokens=10)
    assert dg.generate("hello", max_new_tokens=10, method="guided", beta=0.0).tokens == greedy.tokens  # beta 0 = target
    tok = dg.generate("hello", max_new_tokens=10, beta=0.5)
    spec = dg.generate("hello", max_new_tokens=10, beta=0.5, speculative=True)
    assert tok.method == spec.method == "guided" and spec.tokens == tok.tokens  # exact speculative guided greedy
    assert (tok.stats["n_flips"] == 0) == (tok.tokens == greedy.tokens)  # a flip is where guidance overrode the target
    sampled = dg.generate("hello", max_new_tokens=10, temperature=1.0, seed=1)  # plain sampling: guided at beta 0
    assert sampled.method == "greedy" and len(sampled.tokens) == 10


def test_adapt_and_reset(dg):
    base = dg.draft
    before = {k: v.clone() for k, v in base.state_dict().items()}
    report = dg.adapt("The code word is tulip. The code word is tulip.", steps=2, anchors_per_step=4, eval_anchors=4)
    assert dg.draft is not base and report.steps == 2 and report.loss_after == report.loss_after
    dg.generate("hello", max_new_tokens=4, speculative=True)  # the adapted draft drafts
    with pytest.raises(DraftGuideError, match="already adapted"):
        dg.generate("hello", max_new_tokens=4, ttt=True)
    dg.reset()
    assert dg.draft is base and all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    g = dg.generate(
        "hello", max_new_tokens=4, speculative=True, ttt={"steps": 1, "anchors_per_step": 2, "eval_anchors": 2}
    )
    assert g.ttt["steps"] == 1 and dg.draft is base
