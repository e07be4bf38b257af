"""`draftguide eval`: scoring, resumable runs, recorded failures, bad rows, the LLM judge over real HTTP
(a local OpenAI-compatible server, through the `openai` client) and the torchrun merge."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from draftguide.app.cli import main
from draftguide.experiments.evaluate import METHODS, format_table, score_checks, strip_thinking
from draftguide.experiments.judge import JudgeUnavailable, LLMJudge, parse_verdict


def _task(tid, question, checks=None, rubrics=("The response is an answer.",), sub="A"):
    row = {
        "messages": [{"role": "system", "content": f"context of {tid}"}, {"role": "user", "content": question}],
        "rubrics": list(rubrics),
        "metadata": {"task_id": tid, "context_id": f"c-{tid}", "context_category": "Cat", "sub_category": sub},
    }
    if checks is not None:
        row["checks"] = checks
    return row


ANY = [{"type": "regex", "value": "."}]  # the tiny random model says something: passes
NEVER = [{"type": "contains", "value": "no tiny model says this"}]


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture
def tasks_file(tmp_path):
    return _write(
        tmp_path / "tasks.jsonl",
        [
            _task("t0", "q0", ANY),
            _task("t1", "q1", NEVER, sub="B"),
            _task("t2", "q2", ANY, sub="B"),
            _task("t3", "q3", NEVER),
        ],
    )


def _eval(target_dir, tasks, out, *extra) -> int:
    return main(
        ["eval", "--target", str(target_dir), "--tasks", str(tasks), "--out", str(out), "--max-new-tokens", "6", *extra]
    )


# -- scoring --------------------------------------------------------------------------------------
def test_score_checks():
    checks = [
        {"type": "contains", "value": "Lyon"},
        {"type": "not_contains", "value": "paris"},
        {"type": "regex", "value": r"(?<!\d)21(?!\d)"},
    ]
    ok, details = score_checks("LYON, 21", checks)
    assert ok and [d["passed"] for d in details] == [True, True, True]
    ok, details = score_checks("Lyon, not Paris, 210", checks)
    assert not ok and [d["passed"] for d in details] == [True, False, False]
    assert score_checks("anything", [])[0] is False


def test_strip_thinking():
    assert strip_thinking("<think>hmm, Paris?</think> Lyon") == "Lyon"
    assert strip_thinking("so Paris?</think>Lyon") == "Lyon"  # the template opened the block
    assert strip_thinking("Lyon <think>cut off by the token lim") == "Lyon"


# -- runs -----------------------------------------------------------------------------------------
def test_eval_outputs_and_resume(tmp_path, tiny_target_dir, tasks_file, monkeypatch, capsys):
    calls = []
    real = METHODS["greedy"]
    monkeypatch.setitem(METHODS, "greedy", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "run"
    assert _eval(tiny_target_dir, tasks_file, out, "--limit", "2") == 0
    assert len(calls) == 2
    with (out / "results.jsonl").open("a") as f:
        f.write('{"task_id": "t2", "status": "o')  # a crash mid-write (Ctrl-C, OOM kill)
    assert _eval(tiny_target_dir, tasks_file, out) == 0
    assert len(calls) == 4  # t0, t1 finished before: skipped
    rows = _rows(out)
    assert [r["task_id"] for r in rows] == ["t0", "t1", "t2", "t3"] and [r["score"] for r in rows] == [1, 0, 1, 0]
    r = rows[0]
    for key in (
        "context_category",
        "sub_category",
        "method",
        "response",
        "checks",
        "gen_s",
        "new_tokens",
        "prompt_tokens",
    ):
        assert key in r, key
    assert r["method"] == "greedy" and r["judge"] == "rules" and r["checks"][0]["passed"] is True
    s = json.loads((out / "summary.json").read_text())
    assert s["n"] == 4 and s["solve_rate"] == 0.5 and s["n_errors"] == 0
    assert s["categories"]["Cat"]["subcategories"]["B"] == {"n": 2, "solve_rate": 0.5, "ci95": [0.0, 1.0]}
    assert s["settings"]["method"] == "greedy" and s["settings"]["max_new_tokens"] == 6 and "torch" in s["environment"]
    assert "overall" in capsys.readouterr().out
    assert _eval(tiny_target_dir, tasks_file, out) == 0 and len(calls) == 4  # all done: nothing generated
    assert _eval(tiny_target_dir, tasks_file, out, "--max-new-tokens", "9") == 2  # other settings: refused


def test_failing_task_is_recorded_and_retried(tmp_path, tiny_target_dir, tasks_file, monkeypatch):
    real, broken = METHODS["greedy"], {"on": True}

    def flaky(target, tok, ids, *a, **k):
        if broken["on"] and "q2" in tok.decode(ids[0]).replace(" ", ""):  # the char tokenizer decodes with spaces
            raise RuntimeError("out of memory (simulated)")
        return real(target, tok, ids, *a, **k)

    monkeypatch.setitem(METHODS, "greedy", flaky)
    out = tmp_path / "run"
    assert _eval(tiny_target_dir, tasks_file, out) == 0
    rows = {r["task_id"]: r for r in _rows(out)}
    assert rows["t2"]["status"] == "error" and "out of memory" in rows["t2"]["error"] and rows["t2"]["score"] is None
    assert rows["t3"]["status"] == "ok"  # the run went on
    s = json.loads((out / "summary.json").read_text())
    assert s["n"] == 3 and s["n_errors"] == 1 and s["errors"][0]["task_id"] == "t2"
    broken["on"] = False
    assert _eval(tiny_target_dir, tasks_file, out) == 0
    rows = _rows(out)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)


def test_malformed_rows(tmp_path, tiny_target_dir, capsys):
    bad = _write(
        tmp_path / "bad.jsonl",
        [_task("t0", "q0", ANY), "{oops", {"messages": [{"role": "user", "content": "x"}]}, _task("t3", "q3", NEVER)],
    )
    assert _eval(tiny_target_dir, bad, tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("draftguide: error:") and "bad.jsonl:2: not valid JSON" in err and len(err.splitlines()) == 1
    bad.write_text(bad.read_text().replace("{oops\n", ""))  # now line 2 lacks metadata
    assert _eval(tiny_target_dir, bad, tmp_path / "o") == 2
    assert "bad.jsonl:2: 'metadata'" in capsys.readouterr().err
    _write(
        bad,
        [_task("t0", "q0", ANY), "{oops", {"messages": [{"role": "user", "content": "x"}]}, _task("t3", "q3", NEVER)],
    )
    assert _eval(tiny_target_dir, bad, tmp_path / "o", "--skip-bad") == 0
    rows = _rows(tmp_path / "o")
    assert [r["task_id"] for r in rows] == ["t0", "t3", None, None]
    assert [r.get("line") for r in rows[2:]] == [2, 3] and all(r["status"] == "bad_row" for r in rows[2:])
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["n"] == 2 and s["n_bad_rows"] == 2


def test_rules_judge_needs_checks(tmp_path, tiny_target_dir, capsys):
    f = _write(tmp_path / "t.jsonl", [_task("t0", "q0")])
    assert _eval(tiny_target_dir, f, tmp_path / "o", "--judge", "rules") == 2
    assert "no 'checks'" in capsys.readouterr().err


# -- the LLM judge over HTTP ----------------------------------------------------------------------
class _Judge(BaseHTTPRequestHandler):
    mode, requests = "good", []

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        prompt = body["messages"][-1]["content"]
        n = prompt.count("\n1. ") + sum(prompt.count(f"\n{i}. ") for i in range(2, 10))
        if self.mode == "slow":
            time.sleep(3)
        if self.mode == "malformed":
            content = "Sure! The verdict is {rationale: fine, yes"
        elif self.mode == "fenced_mixed":
            content = (
                "```json\n"
                + json.dumps({"rationale": "r", "rubric_results": ["yes"] + ["no"] * (n - 1), "overall_score": 1})
                + "\n```"
            )
        else:
            content = json.dumps({"rationale": "all met", "rubric_results": ["yes"] * n, "overall_score": 1})
        data = json.dumps(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        ).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass


@pytest.fixture
def judge_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    _Judge.mode, _Judge.requests = "good", []
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_llm_judge_verdicts(judge_server):
    judge = LLMJudge("judge-x", judge_server, api_key="k", timeout=1.0, api_retries=0)
    v = judge(["Says Lyon.", "Does not say Paris."], "Lyon")
    assert v == {"rationale": "all met", "rubric_results": [True, True], "score": 1, "tries": 1, "error": None}
    prompt = _Judge.requests[-1]["messages"][-1]["content"]
    assert "1. Says Lyon." in prompt and "Lyon" in prompt and _Judge.requests[-1]["model"] == "judge-x"

    _Judge.mode = "fenced_mixed"  # overall 1 with an unmet rubric: still 0 (all or nothing)
    v = judge(["a", "b"], "resp")
    assert v["score"] == 0 and v["rubric_results"] == [True, False] and v["error"] is None

    _Judge.mode, n0 = "malformed", len(_Judge.requests)
    v = judge(["a"], "resp")
    assert v["score"] == 0 and v["tries"] == 3 and len(_Judge.requests) - n0 == 3
    assert "unparseable after 3 tries" in v["error"]

    _Judge.mode = "slow"  # no verdict at all: a failed task (JudgeUnavailable), not a 0
    t0 = time.perf_counter()
    with pytest.raises(JudgeUnavailable, match="Timeout"):
        judge(["a"], "resp")
    assert time.perf_counter() - t0 < 2.5


def test_parse_verdict_rejects_wrong_length():
    with pytest.raises(ValueError):
        parse_verdict('{"rationale": "", "rubric_results": ["yes"], "overall_score": 1}', 2)


def test_eval_with_llm_judge(tmp_path, tiny_target_dir, judge_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    f = _write(tmp_path / "t.jsonl", [_task("t0", "q0", rubrics=["r1", "r2"]), _task("t1", "q1", NEVER)])
    out = tmp_path / "o"
    assert _eval(tiny_target_dir, f, out, "--judge-model", "jm", "--judge-base-url", judge_server) == 0
    rows = _rows(out)
    assert rows[0]["judge"] == "llm" and rows[0]["score"] == 1 and rows[0]["rubric_results"] == [True, True]
    assert rows[1]["judge"] == "rules"  # auto: rules where the row has checks
    sent = json.dumps(_Judge.requests)
    assert "context of t0" not in sent and "q0" not in sent  # the judge sees rubrics and response only
    s = json.loads((out / "summary.json").read_text())
    assert s["settings"]["judge_model"] == "jm" and s["n"] == 2


def test_eval_with_llm_judge_batched(tmp_path, tiny_target_dir, judge_server, monkeypatch):
    """--batch-size with the LLM judge: judge calls run beside the decoding; rows equal the batch-1 run's."""
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    f = _write(
        tmp_path / "t.jsonl",
        [_task(f"t{i}", f"question {i}" * (i + 1), rubrics=["r1"]) for i in range(4)] + [_task("t4", "q4", NEVER)],
    )
    one, many = tmp_path / "one", tmp_path / "many"
    assert _eval(tiny_target_dir, f, one, "--judge-model", "jm", "--judge-base-url", judge_server) == 0
    assert (
        _eval(tiny_target_dir, f, many, "--judge-model", "jm", "--judge-base-url", judge_server, "--batch-size", "3")
        == 0
    )
    keys = ("task_id", "judge", "score", "response", "new_tokens")
    assert [{k: r[k] for k in keys} for r in _rows(many)] == [{k: r[k] for k in keys} for r in _rows(one)]
    assert [r["judge"] for r in _rows(many)] == ["llm"] * 4 + ["rules"] and all(
        r["batch_size"] == 3 for r in _rows(many)
    )


def test_llm_judge_needs_a_key(tmp_path, tiny_target_dir, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    f = _write(tmp_path / "t.jsonl", [_task("t0", "q0")])
    assert _eval(tiny_target_dir, f, tmp_path / "o", "--judge-model", "jm") == 2
    assert "OPENAI_API_KEY" in capsys.readouterr().err


def test_format_table():
    s = {
        "n": 2,
        "solve_rate": 0.5,
        "ci95": [0.0, 1.0],
        "n_errors": 1,
        "categories": {
            "Cat": {
                "n": 2,
                "solve_rate": 0.5,
                "ci95": [0.0, 1.0],
                "subcategories": {"A": {"n": 2, "solve_rate": 0.5, "ci95": [0.0, 1.0]}},
            }
        },
    }
    t = format_table(s)
    assert "  A" in t and "overall" in t and "1 errors" in t


# -- torchrun -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_match_single_process(tmp_path, tiny_target_dir):
    rows = [_task(f"t{i}", f"question {i}", ANY if i % 2 else NEVER, sub="AB"[i % 3 == 0]) for i in range(5)]
    f = _write(tmp_path / "t.jsonl", rows)
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert _eval(tiny_target_dir, f, single) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            "-m",
            "draftguide.app.cli",
            "eval",
            "--target",
            str(tiny_target_dir),
            "--tasks",
            str(f),
            "--out",
            str(multi),
            "--max-new-tokens",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("overall") == 1  # rank 0 prints the table
    a, b = _rows(single), _rows(multi)
    key = lambda r: (r["task_id"], r["score"], r["response"], r["sub_category"])  # noqa: E731
    assert [key(r) for r in a] == [key(r) for r in b]
    assert sorted(r["rank"] for r in b) == [0, 0, 0, 1, 1]
    assert sorted(p.name for p in multi.iterdir()) == [
        "command.txt",
        "results.jsonl",
        "run.json",
        "summary.json",
    ]  # rank files merged
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (single, multi))
    assert {k: sa[k] for k in ("n", "solve_rate", "ci95", "categories")} == {
        k: sb[k] for k in ("n", "solve_rate", "ci95", "categories")
    }
