"""`--chat-template-kwargs` / `chat_template_kwargs`: extra chat-template variables reach every place a chat template
is applied, checked with a tokenizer whose template reads such a variable (as Qwen3's reads `enable_thinking`)."""

import json

import pytest
import torch

from conftest import char_tokenizer, tiny_target
from draftguide.app.cli import main
from draftguide.errors import DraftGuideError
from draftguide.modeling.prompts import apply_chat_template, encode_prompt, set_chat_template_kwargs

# Qwen3-like: without enable_thinking=false the assistant turn opens a thinking block
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% if enable_thinking is defined and not enable_thinking %}"
    "<t></t>{% else %}<t>{% endif %}{% endif %}"
)
ROW = {"messages": [{"role": "user", "content": "hi"}]}


def thinking_tokenizer():
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def thinking_target_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("thinking-target")
    tiny_target("qwen3").save_pretrained(path)
    thinking_tokenizer().save_pretrained(path)
    return path


def text(tok, ids):
    return tok.decode(ids[0] if isinstance(ids, torch.Tensor) else ids)


def test_the_variable_reaches_the_template():
    tok = thinking_tokenizer()
    assert text(tok, encode_prompt(tok, ROW)).replace(" ", "").endswith("<t>")
    off = encode_prompt(tok, ROW, chat_template_kwargs={"enable_thinking": False})
    assert text(tok, off).replace(" ", "").endswith("<t></t>")
    set_chat_template_kwargs(tok, '{"enable_thinking": false}')  # the CLI's way: every later template
    assert encode_prompt(tok, ROW).tolist() == off.tolist()
    # a per-call value overrides the tokenizer's
    assert (
        text(tok, encode_prompt(tok, ROW, chat_template_kwargs={"enable_thinking": True}))
        .replace(" ", "")
        .endswith("<t>")
    )
    # the training-data path (a whole conversation, no generation prompt) sees it too
    conv = apply_chat_template(
        tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], add_generation_prompt=False
    )
    assert "<t>" not in text(tok, conv).replace(" ", "")


@pytest.mark.parametrize(
    "bad, msg",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"add_generation_prompt": false}', "may not set add_generation_prompt"),
    ],
)
def test_bad_values_are_refused(bad, msg):
    with pytest.raises(DraftGuideError, match=msg):
        set_chat_template_kwargs(thinking_tokenizer(), bad)


def _prompt_tokens(out):
    return [json.loads(x)["prompt_tokens"] for x in (out / "results.jsonl").read_text().splitlines()]


def test_eval_generate_and_make_data_apply_it(tmp_path, thinking_target_dir, capsys):
    tasks = tmp_path / "t.jsonl"
    tasks.write_text(
        json.dumps({**ROW, "checks": [{"type": "regex", "value": "."}], "metadata": {"task_id": "a"}}) + "\n"
    )
    base = ["eval", "--target", str(thinking_target_dir), "--tasks", str(tasks), "--max-new-tokens", "3"]
    assert main([*base, "--out", str(tmp_path / "on")]) == 0
    assert main([*base, "--out", str(tmp_path / "off"), "--chat-template-kwargs", '{"enable_thinking": false}']) == 0
    assert _prompt_tokens(tmp_path / "off") == [
        p + 4 for p in _prompt_tokens(tmp_path / "on")
    ]  # "</t>": 4 more characters
    assert json.loads((tmp_path / "off" / "run.json").read_text())["chat_template_kwargs"] == {"enable_thinking": False}

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "x", **ROW}) + "\n")
    for name, extra in (("d-on", []), ("d-off", ["--chat-template-kwargs", '{"enable_thinking": false}'])):
        assert (
            main(
                [
                    "make-data",
                    "--target",
                    str(thinking_target_dir),
                    "--prompts",
                    str(prompts),
                    "--out",
                    str(tmp_path / name),
                    "--max-new-tokens",
                    "2",
                    *extra,
                ]
            )
            == 0
        )
    lens = [json.loads((tmp_path / n / "samples.jsonl").read_text())["prompt_len"] for n in ("d-on", "d-off")]
    assert lens[1] == lens[0] + 4

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # refused while parsing the command line, before any model loads
        main(
            [
                "eval",
                "--target",
                str(thinking_target_dir),
                "--tasks",
                str(tasks),
                "--out",
                str(tmp_path / "bad"),
                "--chat-template-kwargs",
                "{oops",
            ]
        )
    assert e.value.code == 2 and "not valid JSON" in capsys.readouterr().err
