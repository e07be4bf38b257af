"""Issue 17, kind 1: sampling parameters at and beyond their edges behave alike in the library, the CLI and
the server: tiny temperatures are greedy, what the OpenAI API accepts is accepted, non-finite numbers refused."""

import json

import pytest
import torch

from conftest import char_tokenizer, tiny_draft, tiny_target
from draftguide.app.pipeline import DraftGuide
from draftguide.errors import DraftGuideError
from draftguide.modeling.sampling import GREEDY_BELOW, check_sampling, probs_from_logits, sample

MSG = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def dg():
    t = tiny_target()
    return DraftGuide(t, char_tokenizer(), tiny_draft(t, mask_token_id=3), name="tiny")


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324, 1e-6, GREEDY_BELOW / 2])
def test_tiny_temperature_is_greedy(temperature):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 30
    p = probs_from_logits(logits, temperature)
    assert (
        torch.isfinite(p).all()
        and torch.equal(p.argmax(-1), logits.argmax(-1))
        and torch.allclose(p.sum(-1), torch.ones(3))
    )
    assert torch.equal(sample(logits, temperature, generator=torch.Generator().manual_seed(1)), logits.argmax(-1))


def test_top_p_zero_and_edges():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    for top_p in (0.0, 1e-12):
        p = probs_from_logits(logits, 1.0, top_p=top_p)
        assert p[0].tolist() == [0.0, 1.0, 0.0, 0.0]  # the most likely token only, never an all-zero row
    assert torch.allclose(probs_from_logits(logits, 1e6), torch.full((1, 4), 0.25), atol=1e-5)  # huge T: near uniform
    for top_k in (-1, 0, 10**6):  # no limit
        assert torch.allclose(probs_from_logits(logits, 1.0, top_k=top_k), torch.softmax(logits, -1))


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=float("nan")),
        dict(temperature=float("inf")),
        dict(temperature=-1e-9),
        dict(top_p=float("nan")),
        dict(top_p=1.5),
        dict(top_p=-0.1),
        dict(top_k=-2),
        dict(top_k=1.5),
        dict(temperature=True),
    ],
)
def test_refused(kw):
    args = dict(temperature=1.0, top_p=1.0, top_k=0) | kw
    with pytest.raises(DraftGuideError):
        check_sampling(**args)


@pytest.mark.parametrize(
    "kw",
    [dict(temperature=0), dict(temperature=2.0), dict(temperature=50.0), dict(top_p=0), dict(top_p=1), dict(top_k=-1)],
)
def test_accepted(kw):
    check_sampling(**(dict(temperature=1.0, top_p=1.0, top_k=0) | kw))


@pytest.mark.parametrize(
    "method, extra",
    [("greedy", {}), ("speculative", {}), ("guided", {"beta": 0.5}), ("guided", {"beta": 0.5, "speculative": True})],
)
def test_library_tiny_temperature_equals_greedy(dg, method, extra):
    want = dg.generate(MSG, max_new_tokens=6, method=method, **extra).tokens
    got = dg.generate(MSG, max_new_tokens=6, method=method, temperature=1e-40, **extra).tokens
    assert got == want


def test_library_refuses_non_finite(dg):
    for bad in (float("nan"), float("inf")):
        with pytest.raises(DraftGuideError, match="finite"):
            dg.generate(MSG, max_new_tokens=2, temperature=bad)


def test_cli_generate_tiny_temperature(tiny_target_dir, tiny_draft_dir, capsys):
    from draftguide.app.cli import main

    base = [
        "generate",
        "--target",
        str(tiny_target_dir),
        "--draft",
        str(tiny_draft_dir),
        "--prompt",
        "Name a colour.",
        "--max-new-tokens",
        "4",
    ]
    assert main(base) == 0
    greedy = capsys.readouterr().out
    assert main(base + ["--temperature", "1e-40"]) == 0
    assert capsys.readouterr().out == greedy
    assert main(base + ["--temperature", "1e-40", "--speculative"]) == 0  # tiny T is greedy: speculative allowed
    assert capsys.readouterr().out == greedy
    for bad in (["--temperature", "nan"], ["--temperature", "inf"], ["--top-p", "nan"], ["--top-k", "-5"]):
        assert main(base + bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("draftguide: error:"), err


def test_cli_speculate_refuses_nan_before_loading(tmp_path, capsys):
    from draftguide.app.cli import main

    assert main(["speculate", "--target", "/nonexistent", "--out", str(tmp_path / "o"), "--temperature", "nan"]) == 2
    assert "finite" in capsys.readouterr().err


def _post(url, body):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        url + "/chat/completions", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_sampling_edges(dg):
    from draftguide.app.server import create_app
    from test_server import running

    with running(create_app(dg)) as url:
        msg = json.dumps(MSG)
        status, greedy = _post(url, f'{{"messages": {msg}, "max_tokens": 4}}')
        assert status == 200
        for extra in (
            '"temperature": 1e-40',
            '"temperature": 0',
            '"top_p": 0, "temperature": 1',
            '"temperature": 1e-40, "top_k": -1',
        ):
            status, r = _post(url, f'{{"messages": {msg}, "max_tokens": 4, {extra}}}')
            assert status == 200, r
            assert r["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"], extra
        status, r = _post(url, f'{{"messages": {msg}, "max_tokens": 4, "temperature": 2, "seed": 1}}')
        assert status == 200  # the OpenAI API's top temperature
        for extra in (
            '"temperature": NaN',
            '"temperature": Infinity',
            '"top_p": NaN',
            '"temperature": 1e999',
            '"top_p": 1.5',
            '"temperature": -0.5',
            '"top_k": -2',
            '"seed": 1e400',
        ):
            status, r = _post(url, f'{{"messages": {msg}, "max_tokens": 4, {extra}}}')
            assert status == 400 and r["error"]["type"] == "invalid_request_error", (extra, r)
        status, r = _post(url, f'{{"messages": {msg}, "max_tokens": 4, "seed": {2**70}}}')
        assert status == 400 and "seed" in r["error"]["message"]


def test_make_data_tiny_temperature_is_greedy(tmp_path, qwen3_pair):
    from draftguide.training.data import make_data, read_samples

    t, _ = qwen3_pair
    rows = [{"id": "a", "prompt": "hello there"}]
    make_data(t, char_tokenizer(), rows, tmp_path / "g", max_new_tokens=4, temperature=0.0, progress=False)
    make_data(t, char_tokenizer(), rows, tmp_path / "t", max_new_tokens=4, temperature=1e-40, progress=False)
    assert read_samples(tmp_path / "t")[0]["input_ids"] == read_samples(tmp_path / "g")[0]["input_ids"]
    with pytest.raises(DraftGuideError, match="finite"):
        make_data(t, char_tokenizer(), rows, tmp_path / "n", max_new_tokens=4, temperature=float("nan"), progress=False)
