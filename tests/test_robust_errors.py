"""Issue 17, kind 11: error messages name the real place (message index, task id, line), never 'prompt ?'."""

import json

import pytest

from conftest import char_tokenizer, tiny_draft, tiny_target
from draftguide.app.pipeline import DraftGuide
from draftguide.errors import DraftGuideError
from draftguide.modeling.prompts import encode_prompt


@pytest.fixture(scope="module")
def dg():
    t = tiny_target()
    return DraftGuide(t, char_tokenizer(), tiny_draft(t, mask_token_id=3), name="tiny")


@pytest.mark.parametrize(
    "row, where",
    [
        ({"prompt": "  ", "_line": 4, "id": "p4"}, "line 4, prompt 'p4': empty prompt"),
        (
            {"messages": [{"role": "user", "content": " \n"}], "_line": 2, "metadata": {"task_id": "t2"}},
            "line 2, task 't2': empty prompt: messages[0].content",
        ),
        (
            {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": " "}]},
            "prompt: empty prompt: every message's content (messages[0..1])",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}, "oops"], "id": 7},
            "prompt 7: messages[1] must be a {role, content} object",
        ),
    ],
)
def test_encode_prompt_names_the_place(row, where):
    with pytest.raises(DraftGuideError) as e:
        encode_prompt(char_tokenizer(), row)
    assert str(e.value).startswith(where) and "?" not in str(e.value), str(e.value)


def test_library(dg):
    with pytest.raises(DraftGuideError, match=r"^prompt: empty prompt"):
        dg.generate("   ", max_new_tokens=2)
    with pytest.raises(DraftGuideError, match=r"^prompt: empty prompt: messages\[0\]\.content is empty"):
        dg.generate([{"role": "user", "content": "\t"}], max_new_tokens=2)


def test_server_messages(dg):
    from draftguide.app.server import create_app
    from test_robust_sampling import _post
    from test_server import running

    with running(create_app(dg)) as url:
        cases = [
            ([{"role": "user", "content": "   "}], "messages[0].content is empty"),
            (
                [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                ],
                "messages[1].content: only text content parts",
            ),
            ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}], "messages[1].role"),
            ([{"role": "user", "content": 5}], "messages[0].content"),
        ]
        for msgs, want in cases:
            status, r = _post(url, json.dumps({"messages": msgs, "max_tokens": 2}))
            assert status == 400 and want in r["error"]["message"] and "?" not in r["error"]["message"], r


def test_cli_eval_names_task_and_line(tmp_path, tiny_target_dir, capsys):
    from draftguide.app.cli import main

    f = tmp_path / "t.jsonl"
    rows = [
        {
            "messages": [{"role": "user", "content": "hi"}],
            "metadata": {"task_id": "a"},
            "checks": [{"type": "contains", "value": "x"}],
        },
        {
            "messages": [{"role": "user", "content": "   "}],
            "metadata": {"task_id": "blank"},
            "checks": [{"type": "contains", "value": "x"}],
        },
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        main(
            [
                "eval",
                "--tasks",
                str(f),
                "--target",
                str(tiny_target_dir),
                "--out",
                str(tmp_path / "o"),
                "--max-new-tokens",
                "2",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 2, task 'blank': empty prompt: messages[0].content" in err[0], err


def test_cli_speculate_names_the_line(tmp_path, tiny_target_dir, tiny_draft_dir, capsys):
    from draftguide.app.cli import main

    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "hi"}) + "\n\n" + json.dumps({"prompt": " "}) + "\n")
    assert (
        main(
            [
                "speculate",
                "--target",
                str(tiny_target_dir),
                "--draft",
                str(tiny_draft_dir),
                "--prompts",
                str(p),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 3, prompt 'p-1': empty prompt" in err[0], err
