"""Issue 17, kind 4: OpenAI fields the server used to ignore silently. `stream_options.include_usage` gives a
final usage chunk; `logprobs` / `top_logprobs` return the target's log-probabilities (the `draftguide` field says
so); every other field we do not support is a 400 naming it."""

import json
import math

import pytest
import torch
from openai import BadRequestError, OpenAI

from conftest import char_tokenizer, tiny_draft, tiny_target
from draftguide.app.pipeline import DraftGuide
from draftguide.app.server import SUPPORTED_FIELDS, create_app

MSG = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def dg():
    t = tiny_target()
    return DraftGuide(t, char_tokenizer(), tiny_draft(t, mask_token_id=3), name="tiny")


@pytest.fixture(scope="module")
def url(dg):
    from test_server import running

    with running(create_app(dg)) as u:
        yield u


@pytest.fixture
def client(url):
    return OpenAI(base_url=url, api_key="none", timeout=30, max_retries=0)


def test_include_usage_gives_a_final_usage_chunk(client):
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MSG, max_tokens=7, stream=True, stream_options={"include_usage": True}
        )
    )
    last = chunks[-1]
    assert (
        last.choices == []
        and last.usage.completion_tokens == 7
        and last.usage.total_tokens == last.usage.prompt_tokens + 7
    )
    assert all(c.usage is None for c in chunks[:-1])
    plain = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=7)
    assert last.usage.prompt_tokens == plain.usage.prompt_tokens
    no_usage = list(client.chat.completions.create(model="tiny", messages=MSG, max_tokens=3, stream=True))
    assert all(c.choices for c in no_usage)  # without include_usage: no usage chunk


def _reference_logprobs(dg, g):
    ids = dg.encode(MSG)
    seq = torch.cat([ids, torch.tensor([g.tokens])], 1)
    with torch.inference_mode():
        logits = dg.target(seq).logits[0, ids.shape[1] - 1 : -1]
    return torch.log_softmax(logits.float(), -1)


@pytest.mark.parametrize("extra", [{}, {"beta": 0.5}])
def test_logprobs_are_the_targets(client, dg, extra):
    r = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=6, logprobs=True, top_logprobs=5, extra_body=extra
    )
    content = r.choices[0].logprobs.content
    g = dg.generate(MSG, max_new_tokens=6, **extra)
    ref = _reference_logprobs(dg, g)
    assert len(content) == 6 and [e.token for e in content] == [dg.tokenizer.decode([t]) for t in g.tokens]
    for i, e in enumerate(content):
        assert math.isclose(e.logprob, float(ref[i, g.tokens[i]]), abs_tol=1e-4)
        assert len(e.top_logprobs) == 5 and e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob
        assert math.isclose(e.top_logprobs[0].logprob, float(ref[i].max()), abs_tol=1e-4)
        assert bytes(e.bytes) == e.token.encode()
    assert r.model_extra["draftguide"]["logprobs_from"] == "target"
    plain = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=3)
    assert plain.choices[0].logprobs is None and "logprobs_from" not in plain.model_extra["draftguide"]


def test_logprobs_without_top(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=3, logprobs=True)
    assert [e.top_logprobs for e in r.choices[0].logprobs.content] == [[], [], []]


def _post(url, body):
    from test_robust_sampling import _post as post

    return post(url, json.dumps(body))


@pytest.mark.parametrize(
    "extra, what",
    [
        ({"frobnicate": 1}, "frobnicate: unsupported field"),
        ({"functions": []}, "functions: unsupported field"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": -1}, "presence_penalty"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"top_logprobs": 3}, "top_logprobs needs logprobs"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options is only allowed when stream is true"),
        ({"stream": True, "logprobs": True}, "logprobs are not supported with stream"),
        ({"stream": True, "stream_options": {"include_usage": True, "other": 1}}, "stream_options.other"),
    ],
)
def test_unsupported_fields_are_a_400(url, extra, what):
    status, err = _post(url, {"messages": MSG, "max_tokens": 2} | extra)
    assert status == 400 and err["error"]["type"] == "invalid_request_error"
    assert what in err["error"]["message"], err


@pytest.mark.parametrize(
    "extra",
    [
        {"user": "u1"},
        {"frequency_penalty": 0, "presence_penalty": 0},
        {"logit_bias": {}},
        {"response_format": {"type": "text"}},
        {"tools": [], "tool_choice": "none"},
        {"temperature": None, "top_p": None, "n": None, "seed": None, "stop": None},
    ],
)
def test_neutral_values_are_accepted(url, extra):
    status, r = _post(url, {"messages": MSG, "max_tokens": 2} | extra)
    assert status == 200, r


def test_supported_fields_are_listed_in_the_readme():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    missing = [f for f in SUPPORTED_FIELDS if f"`{f}`" not in readme]
    assert not missing, missing


def test_openai_client_sees_the_400(client):
    with pytest.raises(BadRequestError, match="frequency_penalty"):
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2, frequency_penalty=1.0)
