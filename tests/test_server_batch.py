"""Server micro-batching: requests that wait together are decoded together (`--max-batch`), each with its own
parameters, stop strings and stream, and each reply equals the reply the request gets alone."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import char_tokenizer, tiny_draft, tiny_target

pytest.importorskip("fastapi")
from openai import OpenAI  # noqa: E402

from draftguide.app.pipeline import DraftGuide  # noqa: E402
from draftguide.app.server import create_app  # noqa: E402
from test_server import running  # noqa: E402


class Gated(DraftGuide):
    """The first model call waits for `gate`, so the requests sent meanwhile queue up and form one batch."""

    gate = threading.Event()

    def generate_jobs(self, jobs):
        self.gate.wait(30)
        return super().generate_jobs(jobs)


REQUESTS = [
    dict(messages=[{"role": "user", "content": "hello there"}], max_tokens=10),
    dict(messages=[{"role": "user", "content": "a longer question, please"}], max_tokens=6, temperature=1.0, seed=4),
    dict(messages=[{"role": "user", "content": "third"}], max_tokens=12, stop=["e"]),
    dict(messages=[{"role": "user", "content": "fourth one"}], max_tokens=8, top_p=0.5, temperature=1.0, seed=1),
]


def _ask(client, r, stream=False):
    if not stream:
        c = client.chat.completions.create(model="tiny", **r)
        return (
            c.choices[0].message.content,
            c.choices[0].finish_reason,
            c.usage.completion_tokens,
            c.model_extra["draftguide"],
        )
    parts, finish = [], None
    for ch in client.chat.completions.create(model="tiny", stream=True, **r):
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
            finish = ch.choices[0].finish_reason or finish
    return "".join(parts), finish


def test_waiting_requests_form_one_batch_and_match_their_lone_replies():
    t = tiny_target()
    dg = Gated(t, char_tokenizer(), tiny_draft(t, mask_token_id=3), name="tiny")
    Gated.gate.set()
    app = create_app(dg, max_batch=8)
    with running(app) as url:
        client = OpenAI(base_url=url, api_key="x")
        alone = [_ask(client, r) for r in REQUESTS]
        alone_stream = _ask(client, REQUESTS[2], stream=True)
        assert app.state.worker.batches == [1] * 5
        Gated.gate.clear()
        with ThreadPoolExecutor(6) as pool:
            first = pool.submit(_ask, client, REQUESTS[0])  # takes the model, waits at the gate
            while app.state.worker.jobs.qsize() or not app.state.worker.batches[5:]:
                threading.Event().wait(0.02)
            futs = [pool.submit(_ask, client, r) for r in REQUESTS[1:]] + [pool.submit(_ask, client, REQUESTS[2], True)]
            while app.state.worker.jobs.qsize() < 4:
                threading.Event().wait(0.02)
            Gated.gate.set()
            together = [first.result()] + [f.result() for f in futs]
    assert app.state.worker.batches[5:] == [1, 4]
    assert [x[:3] for x in together[:4]] == [x[:3] for x in alone]
    assert together[4] == alone_stream and alone_stream[0] == alone[2][0]
    assert alone[2][1] == "stop"  # the stop string ended that one early
    assert [x[3]["batch_size"] for x in together[1:4]] == [4, 4, 4]
    assert together[1][3]["seed"] == 4


def test_chat_template_kwargs_per_request():
    from test_chat_template_kwargs import thinking_tokenizer

    t = tiny_target()
    dg = DraftGuide(t, thinking_tokenizer(), tiny_draft(t, mask_token_id=3), name="tiny")
    with running(create_app(dg)) as url:
        client = OpenAI(base_url=url, api_key="x")

        def ask(**kw):
            return client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=2,
                **kw,
            ).usage.prompt_tokens

        on, off = ask(), ask(extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert off == on + 4  # "</t>" closes the thinking block: 4 more characters
        with pytest.raises(Exception, match="may not set add_generation_prompt"):
            ask(extra_body={"chat_template_kwargs": {"add_generation_prompt": False}})
