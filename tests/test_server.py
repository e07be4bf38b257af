"""The OpenAI-compatible server, driven by the real `openai` client against a live uvicorn on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import char_tokenizer, tiny_draft, tiny_target

pytest.importorskip("fastapi")
import uvicorn  # noqa: E402
from openai import APIError, AsyncOpenAI, BadRequestError, OpenAI  # noqa: E402

from draftguide.app.pipeline import DraftGuide  # noqa: E402
from draftguide.app.server import create_app  # noqa: E402

MSG = [{"role": "user", "content": "hello there"}]


class Boom(DraftGuide):
    """Raises inside the model call when the prompt asks for it (a bug in one request); records how many
    tokens each model call decoded."""

    decoded: list[int] = []

    def _decode(self, method, ids, n, beta, speculative, temperature, top_p, top_k, stop_ids, seed, on_token, options):
        if "boom" in self.tokenizer.decode(ids[0].tolist()).replace(" ", ""):  # the char tokenizer spaces out
            raise RuntimeError("kaboom")
        self.decoded.append(0)

        def counting(new):
            self.decoded[-1] += len(new)
            on_token(new)

        return super()._decode(
            method, ids, n, beta, speculative, temperature, top_p, top_k, stop_ids, seed, counting, options
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dg():
    t = tiny_target()
    return Boom(t, char_tokenizer(), tiny_draft(t, mask_token_id=3), name="tiny")


@contextlib.contextmanager
def running(app):
    """uvicorn in a thread on a free local port; yields the /v1 base URL; stops and joins on exit."""
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and th.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        srv.should_exit = True
        th.join(timeout=10)
        assert not th.is_alive()


@pytest.fixture(scope="module")
def server(dg):
    with running(create_app(dg, max_pending=64)) as url:
        yield url


@pytest.fixture
def client(server):
    return OpenAI(base_url=server, api_key="none", timeout=30, max_retries=0)


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/chat/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_matches_the_library(client, dg):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=12)
    want = dg.generate(MSG, max_new_tokens=12)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == want.prompt_tokens


def test_speculative_is_lossless_through_the_server(client):
    plain = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=16)
    spec = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=16, extra_body={"method": "speculative"}
    )
    assert spec.choices[0].message.content == plain.choices[0].message.content
    assert spec.model_extra["draftguide"]["method"] == "speculative"
    assert spec.model_extra["draftguide"]["tau"] >= 1.0


def test_streaming_concatenates_to_the_full_reply(client):
    full = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=10).choices[0].message.content
    chunks = list(client.chat.completions.create(model="tiny", messages=MSG, max_tokens=10, stream=True))
    pieces = [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(pieces) == full
    assert sum(bool(p) for p in pieces) > 1  # really incremental
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_string(client):
    full = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=16).choices[0].message.content
    stop = full[6:9]
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=16, stop=[stop])
    assert r.choices[0].message.content == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=16, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == full[: full.find(stop)]


@pytest.mark.parametrize(
    "body, what",
    [
        (b"{not json", "JSON"),
        (json.dumps({"messages": []}).encode(), "messages"),
        (json.dumps({"messages": [{"role": "user"}], "max_tokens": 0}).encode(), "max_tokens"),
        (json.dumps({"messages": MSG, "temperature": -1}).encode(), "temperature"),
        (json.dumps({"messages": MSG, "method": "nope"}).encode(), "unknown method"),
        (json.dumps({"messages": MSG, "beta": 0.5, "method": "greedy"}).encode(), "needs method 'guided'"),
        (json.dumps({"messages": MSG, "beta": 2}).encode(), "beta"),
        (
            json.dumps({"messages": MSG, "mix": "logits", "method": "greedy"}).encode(),
            "not an option of method 'greedy'",
        ),
        (json.dumps({"messages": MSG, "beta": 0.5, "beta_schedule": "sometimes"}).encode(), "beta_schedule"),
        (json.dumps({"messages": MSG, "beta": 0.5, "mix": "logprobs"}).encode(), "use mix 'probs'"),
    ],
)
def test_malformed_request_is_a_400_json_error(server, body, what):
    status, err = _post(server, body)
    assert status == 400
    assert err["error"]["type"] == "invalid_request_error"
    assert what.lower() in err["error"]["message"].lower(), err


def test_openai_client_sees_bad_request(client):
    with pytest.raises(BadRequestError):
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=4, n=2)


def test_a_failing_request_does_not_take_the_server_down(client):
    boom = [{"role": "user", "content": "boom"}]
    with pytest.raises(APIError) as e:
        client.chat.completions.create(model="tiny", messages=boom, max_tokens=4)
    assert "kaboom" in str(e.value)
    streamed = client.chat.completions.create(model="tiny", messages=boom, max_tokens=4, stream=True)
    with pytest.raises(APIError):
        list(streamed)
    assert client.chat.completions.create(model="tiny", messages=MSG, max_tokens=4).choices[0].message.content


def test_fifty_concurrent_requests(server, dg):
    want = {i: dg.generate([{"role": "user", "content": f"q{i}"}], max_new_tokens=6).text for i in range(50)}

    async def go():
        c = AsyncOpenAI(base_url=server, api_key="none", timeout=60, max_retries=0)

        async def one(i):
            kw = dict(model="tiny", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=6)
            if i % 2:
                return "".join(
                    [
                        ch.choices[0].delta.content or ""
                        async for ch in await c.chat.completions.create(stream=True, **kw)
                    ]
                )
            return (await c.chat.completions.create(**kw)).choices[0].message.content

        try:
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(50))), timeout=120)
        finally:
            await c.close()

    got = asyncio.run(go())
    assert dict(enumerate(got)) == want  # serialized model calls: nobody sees anybody else's tokens


def test_busy_server_rejects_with_503(dg):
    with running(create_app(dg, max_pending=0)) as url:
        status, err = _post(url, json.dumps({"messages": MSG, "max_tokens": 2}).encode())
    assert status == 503 and err["error"]["type"] == "server_busy"


def test_serve_binds_localhost_by_default():
    import inspect

    from draftguide.app.cli import build_parser
    from draftguide.app.server import serve

    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.port == 8000


def test_cli_serve_rejects_contradictory_defaults_before_loading(capsys):
    from draftguide.app.cli import main

    assert main(["serve", "--method", "greedy", "--beta", "0.5"]) == 2
    assert "needs method 'guided'" in capsys.readouterr().err


def test_guided_and_ttt_body_fields(client, dg):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, extra_body={"beta": 0.5})
    assert r.choices[0].message.content == dg.generate(MSG, max_new_tokens=8, beta=0.5).text
    r2 = client.chat.completions.create(
        model="tiny",
        messages=MSG,
        max_tokens=8,
        extra_body={"beta": 0.5, "beta_schedule": "adaptive", "guard_top_k": 2, "mix": "probs"},
    )
    assert (
        r2.choices[0].message.content
        == dg.generate(MSG, max_new_tokens=8, beta=0.5, beta_schedule="adaptive", guard_top_k=2, mix="probs").text
    )
    assert r.model_extra["draftguide"]["method"] == "guided" and r.model_extra["draftguide"]["n_flips"] is not None
    base = dg.draft
    r = client.chat.completions.create(
        model="tiny",
        messages=MSG,
        max_tokens=4,
        extra_body={"method": "speculative", "ttt": {"steps": 1, "anchors_per_step": 2, "eval_anchors": 2}},
    )
    assert r.model_extra["draftguide"]["ttt"]["steps"] == 1 and dg.draft is base  # adapted for the request, then reset
    status, err = _post(
        client.base_url.__str__().rstrip("/"), json.dumps({"messages": MSG, "ttt": {"steps": -1}}).encode()
    )
    assert status == 400 and "steps" in err["error"]["message"]


def test_a_client_that_goes_away_frees_the_model(client, dg):
    stream = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=400, stream=True)
    next(iter(stream))
    stream.close()  # disconnect after the first chunk: the worker stops at its next token
    assert client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2).choices[0].message.content
    abandoned = dg.decoded[-2]  # requests are serialized: the abandoned one ran just before
    assert 1 <= abandoned < 400


def test_cli_serve_in_a_subprocess(tiny_target_dir, tiny_draft_dir):
    import os
    import subprocess
    import sys

    port = _free_port()
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "draftguide.app.cli",
            "serve",
            "--target",
            str(tiny_target_dir),
            "--draft",
            str(tiny_draft_dir),
            "--port",
            str(port),
            "--model-name",
            "tiny-cli",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        c = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=10, max_retries=0)
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None and time.time() < deadline, "server did not come up"
            try:
                assert [m.id for m in c.models.list().data] == ["tiny-cli"]
                break
            except APIError:
                time.sleep(0.2)
        r = c.chat.completions.create(
            model="tiny-cli", messages=MSG, max_tokens=5, extra_body={"method": "speculative"}
        )
        assert r.usage.completion_tokens == 5
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"serving tiny-cli on http://127.0.0.1:{port}/v1" in out


def test_server_defaults_serve_clients_that_send_only_model_and_messages(dg):
    defaults = {"method": "guided", "beta": 0.5, "max_new_tokens": 6}
    with running(create_app(dg, defaults=defaults)) as url:
        c = OpenAI(base_url=url, api_key="none", timeout=30, max_retries=0)
        r = c.chat.completions.create(model="tiny", messages=MSG)  # what CL-bench's infer.py sends
        assert r.model_extra["draftguide"]["method"] == "guided" and r.usage.completion_tokens == 6
        assert r.choices[0].message.content == dg.generate(MSG, beta=0.5, max_new_tokens=6).text
        r = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=3, extra_body={"beta": 0.0})
        assert r.model_extra["draftguide"]["method"] == "greedy" and r.usage.completion_tokens == 3
        r = c.chat.completions.create(model="tiny", messages=MSG, extra_body={"method": "speculative"})
        assert r.model_extra["draftguide"]["method"] == "speculative"
    with pytest.raises(Exception, match="needs method 'guided'"):
        create_app(dg, defaults={"method": "greedy", "beta": 0.5})


def test_serve_ttt_defaults_build_from_the_command_line():
    """`draftguide serve --ttt` (which has no --seed) turns its TTT flags into per-request defaults."""
    from draftguide.app.cli import build_parser
    from draftguide.app.cli.options import ttt_config as _ttt_config

    args = build_parser().parse_args(["serve", "--ttt", "--ttt-steps", "3"])
    cfg = _ttt_config(args, seed=0).kwargs()
    assert cfg["steps"] == 3 and cfg["seed"] == 0 and cfg["target_modules"] == ("fc", "q_proj", "k_proj", "v_proj")
