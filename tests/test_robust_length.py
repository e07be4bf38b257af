"""Issue 17, kind 7: prompts longer than the target's positions are refused with one clear line everywhere
prompts enter (speculate, eval, diagnose, generate, ttt-tau, TTT contexts, the server), by one check."""

import json

import pytest
import torch

from conftest import char_tokenizer, tiny_draft, tiny_target
from draftguide.app.pipeline import DraftGuide
from draftguide.errors import DraftGuideError

LIMIT = 64
LONG = "Tell me about " + "the colour of the sea and the sky " * 5  # ~180 characters, one token each


@pytest.fixture(scope="module")
def short_pair():
    t = tiny_target()
    t.config.max_position_embeddings = LIMIT
    return t, tiny_draft(t, mask_token_id=3)


@pytest.fixture(scope="module")
def dirs(short_pair, tmp_path_factory):
    t, d = short_pair
    root = tmp_path_factory.mktemp("short")
    t.save_pretrained(root / "target")
    char_tokenizer().save_pretrained(root / "target")
    d.save_pretrained(root / "draft")
    return root / "target", root / "draft"


def _one_error_line(capsys, *needles):
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("draftguide: error:"), err
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def test_check_length_unit():
    from draftguide.modeling.prompts import check_length

    t = tiny_target()
    t.config.max_position_embeddings = 10
    check_length(t, 10)
    check_length(t, 6, 4)
    with pytest.raises(DraftGuideError, match="line 3: the prompt has 11 tokens, more than the target's 10 positions"):
        check_length(t, 11, where="line 3")
    with pytest.raises(DraftGuideError, match="ask for at most 4 new tokens"):
        check_length(t, 6, 5)


def test_library_generate_and_adapt(short_pair):
    t, d = short_pair
    dg = DraftGuide(t, char_tokenizer(), d)
    for method in ("greedy", "speculative", "guided"):
        with pytest.raises(DraftGuideError, match="max_position_embeddings"):
            dg.generate(LONG, max_new_tokens=4, method=method, beta=0.5 if method == "guided" else 0.0)
    with pytest.raises(DraftGuideError, match="TTT context"):
        dg.adapt(LONG)
    from draftguide.training.ttt import ttt_adapt

    with pytest.raises(DraftGuideError, match="TTT context: the context has"):
        ttt_adapt(d, t, torch.arange(4, 90)[None], steps=1)
    assert dg.generate("hi", max_new_tokens=4).tokens  # a short prompt still runs


def test_cli_generate(dirs, capsys):
    from draftguide.app.cli import main

    target, draft = dirs
    assert (
        main(["generate", "--target", str(target), "--draft", str(draft), "--prompt", LONG, "--max-new-tokens", "4"])
        == 2
    )
    _one_error_line(capsys, "max_position_embeddings", f"{LIMIT} positions")


def test_cli_speculate(dirs, tmp_path, capsys):
    from draftguide.app.cli import main

    target, draft = dirs
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"id": "short", "prompt": "hi"}) + "\n" + json.dumps({"id": "long", "prompt": LONG}) + "\n")
    assert (
        main(
            [
                "speculate",
                "--target",
                str(target),
                "--draft",
                str(draft),
                "--prompts",
                str(p),
                "--out",
                str(tmp_path / "o"),
                "--max-new-tokens",
                "4",
            ]
        )
        == 2
    )
    _one_error_line(capsys, "line 2, prompt 'long'", "max_position_embeddings")


def _task(tid, text):
    return {
        "messages": [{"role": "user", "content": text}],
        "metadata": {"task_id": tid},
        "checks": [{"type": "contains", "value": "x"}],
        "reference_answer": "blue",
    }


def test_cli_eval_and_diagnose(dirs, tmp_path, capsys):
    from draftguide.app.cli import main

    target, draft = dirs
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps(_task(tid, text)) + "\n" for tid, text in (("ok", "hi"), ("too-long", LONG))))
    assert (
        main(
            ["eval", "--tasks", str(f), "--target", str(target), "--out", str(tmp_path / "e"), "--max-new-tokens", "4"]
        )
        == 2
    )
    _one_error_line(capsys, "line 2, task 'too-long'", "max_position_embeddings")
    assert (
        main(
            [
                "diagnose",
                "--tasks",
                str(f),
                "--target",
                str(target),
                "--draft",
                str(draft),
                "--out",
                str(tmp_path / "d"),
                "--no-solve",
                "--no-controls",
                "--n-boot",
                "10",
            ]
        )
        == 2
    )
    _one_error_line(capsys, "task 'too-long'", "prompt with its reference answer")


def test_cli_ttt_tau(dirs, tmp_path, capsys):
    from draftguide.app.cli import main

    target, draft = dirs
    p = tmp_path / "ctx.jsonl"
    p.write_text(json.dumps({"id": "c1", "prompt": LONG}) + "\n")
    assert (
        main(
            [
                "ttt-tau",
                "--target",
                str(target),
                "--draft",
                str(draft),
                "--sets",
                str(p),
                "--out",
                str(tmp_path / "o"),
                "--max-new-tokens",
                "4",
                "--ttt-steps",
                "1",
            ]
        )
        == 2
    )
    _one_error_line(capsys, "ctx context 'c1'", "max_position_embeddings")


def test_server(short_pair):
    from draftguide.app.server import create_app
    from test_robust_sampling import _post
    from test_server import running

    t, d = short_pair
    dg = DraftGuide(t, char_tokenizer(), d)
    with running(create_app(dg)) as url:
        status, r = _post(url, json.dumps({"messages": [{"role": "user", "content": LONG}], "max_tokens": 4}))
        assert status == 400 and "max_position_embeddings" in r["error"]["message"]
        status, r = _post(url, json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 60}))
        assert status == 400 and "ask for at most" in r["error"]["message"]
        status, r = _post(
            url, json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        )  # default 512 shrinks to fit
        assert status == 200 and r["usage"]["total_tokens"] <= LIMIT
