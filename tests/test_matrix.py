"""`draftguide matrix` on tiny local models; the aligned readout in guided decoding; the shuffled-readout null."""

import json

import pytest
import torch

from conftest import tiny_draft, tiny_target
from draftguide.app.cli import main
from draftguide.decode.guided import guided_generate, readout_trajectory
from draftguide.errors import DraftGuideError
from draftguide.modeling.draft_io import check_speculative_spec, is_aligned_readout, shipped_draft

ANY = [{"type": "regex", "value": "."}]
NEVER = [{"type": "contains", "value": "no tiny model says this"}]


def _task(tid, question, checks, cat="Cat"):
    return {
        "messages": [
            {"role": "system", "content": f"context of {tid}: abc xyz"},
            {"role": "user", "content": question},
        ],
        "checks": checks,
        "metadata": {"task_id": tid, "context_category": cat, "sub_category": "A"},
    }


@pytest.fixture
def tasks_file(tmp_path):
    path = tmp_path / "tasks.jsonl"
    rows = [
        _task("t0", "q0 abc", ANY),
        _task("t1", "q1 xyz", NEVER, "Dog"),
        _task("t2", "q2", ANY),
        _task("t3", "q3", NEVER, "Dog"),
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_aligned_readout_is_known_from_its_config(tiny_readout_dir, tiny_draft_dir):
    assert (
        is_aligned_readout(tiny_readout_dir)
        and not is_aligned_readout(tiny_draft_dir)
        and not is_aligned_readout("init")
    )
    with pytest.raises(DraftGuideError, match="aligned readout"):
        check_speculative_spec(tiny_readout_dir)
    check_speculative_spec(tiny_draft_dir)


def test_guidance_default_falls_back_with_a_notice(monkeypatch, tmp_path):
    import draftguide.modeling.draft_io as dr

    spec, readout = tmp_path / "spec", tmp_path / "readout"
    spec.mkdir()
    monkeypatch.setitem(dr.SHIPPED_DRAFTS, "t", spec)
    monkeypatch.setitem(dr.SHIPPED_READOUTS, "t", readout)
    notes = []
    assert shipped_draft("t", "guidance", notes.append) == spec and len(notes) == 1 and "not shipped" in notes[0]
    readout.mkdir()
    (readout / "config.json").write_text("{}")
    assert shipped_draft("t", "guidance", notes.append) == readout and len(notes) == 1
    assert shipped_draft("t", "speculative") == spec


def test_cli_speculative_refuses_an_aligned_readout_in_one_line(
    tmp_path, tiny_target_dir, tiny_readout_dir, tasks_file, capsys
):
    base = ["--target", str(tiny_target_dir), "--draft", str(tiny_readout_dir)]
    ev = [
        "eval",
        *base,
        "--tasks",
        str(tasks_file),
        "--max-new-tokens",
        "4",
        "--judge",
        "rules",
        "--method",
        "guided",
        "--beta",
        "0.5",
    ]
    for argv in (
        ev + ["--out", str(tmp_path / "x"), "--speculative"],
        ["generate", *base, "--prompt", "hi", "--beta", "0.5", "--speculative", "--max-new-tokens", "4"],
        [
            "speculate",
            *base,
            "--prompts",
            "builtin",
            "--limit",
            "1",
            "--out",
            str(tmp_path / "s"),
            "--max-new-tokens",
            "4",
        ],
    ):
        assert main(argv) == 2, argv[0]
        err = capsys.readouterr().err.strip()
        assert "aligned readout" in err and len(err.splitlines()) == 1
    assert main(ev + ["--out", str(tmp_path / "ok")]) == 0  # token by token it guides
    rows = [json.loads(x) for x in (tmp_path / "ok" / "results.jsonl").read_text().splitlines()]
    assert all(r["status"] == "ok" for r in rows)
    capsys.readouterr()
    assert main(["generate", *base, "--prompt", "hi", "--beta", "0.5", "--max-new-tokens", "4"]) == 0


def test_shuffle_null_uses_the_donor_readout():
    t = tiny_target()
    d = tiny_draft(t)
    a = torch.randint(4, 90, (1, 12), generator=torch.Generator().manual_seed(1))
    b = torch.randint(4, 90, (1, 9), generator=torch.Generator().manual_seed(2))
    # the readout along a's own greedy path equals what guided decoding reads token by token (beta 1: readout alone)
    out, _ = guided_generate(t, d, a, beta=0.0, max_new_tokens=6)
    traj = readout_trajectory(t, d, a, out[0, 12:].tolist())
    own, _ = guided_generate(t, d, a, beta=1.0, max_new_tokens=6)
    assert traj.shape == (6, t.config.vocab_size)
    # the shuffled null at beta 1 emits the donor's readout argmax at each step, whatever this prompt says
    donor = readout_trajectory(t, d, b, [5, 6, 7])
    sh, st = guided_generate(t, d, a, beta=1.0, max_new_tokens=5, control="shuffle", donor_logits=donor)
    assert sh[0, 12:].tolist() == [int(donor[i % 3].argmax()) for i in range(5)]
    spec, _ = guided_generate(
        t, d, a, beta=1.0, max_new_tokens=5, control="shuffle", donor_logits=donor, speculative=True
    )
    assert spec.tolist() == sh.tolist()
    with pytest.raises(DraftGuideError, match="donor_logits"):
        guided_generate(t, d, a, beta=0.5, max_new_tokens=2, control="shuffle")
    # a real readout: token by token the same tokens as teacher forcing's argmax along its own path
    path = own[0, 12:]
    assert torch.equal(readout_trajectory(t, d, a, path.tolist()).argmax(-1)[: len(path)], path)


def test_matrix_writes_every_row(tmp_path, tiny_target_dir, tiny_draft_dir, tiny_readout_dir, tasks_file, capsys):
    out = tmp_path / "m"
    argv = [
        "matrix",
        "--target",
        str(tiny_target_dir),
        "--readouts",
        f"{tiny_readout_dir},{tiny_draft_dir}",
        "--tasks",
        str(tasks_file),
        "--out",
        str(out),
        "--betas",
        "0.5,1",
        "--max-new-tokens",
        "5",
        "--ttt-steps",
        "1",
        "--ttt-anchors",
        "4",
        "--n-boot",
        "200",
    ]
    assert main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["kind"] == "matrix" and list(s["config"]["readouts"]) == ["aligned", "speculative"]
    names = [e["row"] for e in s["rows"]]
    expected = {
        "greedy",
        "sample",
        "power",
        "dola",
        "guided aligned b0.5",
        "guided aligned b1",
        "guided speculative b0.5",
        "guided speculative b1",
        "ttt+guided aligned b0.5",
        "ttt+guided aligned b1",
        "noise null b0.5",
        "noise null b1",
        "shuffle null b0.5",
        "shuffle null b1",
        "adaptive aligned b0.5",
        "adaptive aligned b1",
    }
    assert set(names) == expected
    for e in s["rows"]:
        assert e["n"] == 4 and len(e["ci95"]) == 2 and 0 <= e["solve_rate"] <= 1, e["row"]
        if e["row"] != "greedy":
            v = e["vs_greedy"]
            assert v["n"] == 4 and len(v["ci"]) == 2 and len(v["fixed"]) + len(v["broken"]) <= 4
    assert s["decision"] in ("2.2 > baseline", "2.3 > 2.2 > baseline", "2.3 > baseline only", "all about baseline")
    assert s["best_2_2"]["family_size"] == 4 and s["best_2_3"]["family_size"] == 2
    flips = next(e for e in s["rows"] if e["row"] == "guided aligned b1")["flips"]
    assert flips["n_flips"] > 0 and flips["all"]["n"] == flips["n_flips"]
    shuffle_rows = [
        json.loads(x) for x in (out / "sweep_aligned" / "shuffle_b1" / "results.jsonl").read_text().splitlines()
    ]
    assert [r["donor_task_id"] for r in shuffle_rows] == ["t1", "t2", "t3", "t0"]
    report = (out / "report.md").read_text()
    assert "Which row of the decision matrix holds" in report and "| 2.3 | ttt+guided aligned b1 | 4 |" in report
    assert "top-k constrained guidance" in report and (out / "per_task.jsonl").is_file()
    fc = s["failure_classes"]  # 3.1: the deciding rows' taxonomy flip tables against greedy
    assert s["best_2_2"]["row"] in fc and s["best_2_3"]["row"] in fc
    assert f"noise null b{s['best_2_2']['beta']:g}" in fc
    best = s["best_2_2"]
    assert fc[best["row"]]["fixed"] == len(best["vs_greedy"]["fixed"])
    assert fc[best["row"]]["caused"] == len(best["vs_greedy"]["broken"])
    for table in fc.values():
        assert table["n_tasks"] == 4 and table["net"] == table["fixed"] - table["caused"]
    assert "## 3.1: which failure classes guidance fixes" in report
    err = capsys.readouterr()
    assert "decision matrix:" in err.out
    assert main(argv) == 0  # resumes: every run is finished, the analysis is redone
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert "The decision matrix" in (tmp_path / "rep" / "report.md").read_text()


def test_flip_words_and_context_tags():
    from tokenizers import decoders

    from conftest import char_tokenizer
    from draftguide.experiments.evaluate import token_word
    from draftguide.experiments.matrix import flip_tags, starts_word

    tok = char_tokenizer()
    tok.backend_tokenizer.decoder = decoders.Fuse()  # decode as BPE tokenizers do: pieces joined as they are
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    new = ids("say tulip now")
    assert token_word(tok, new[:5], new[5], new[6:]) == "tulip"  # the 'u' of tulip: its whole word
    assert token_word(tok, new[:3], new[3], new[4:]) is None  # a space holds no word
    assert token_word(tok, new[:5], ids("r")[0]) == "tr"  # the target side: known up to the token's end
    assert starts_word("The tree grows", "tr") and not starts_word("The street", "tr")
    task = {
        "messages": [{"role": "system", "content": "The code word is tulip."}, {"role": "user", "content": "Word?"}],
        "metadata": {"task_id": "t"},
    }
    rows = [
        {
            "task_id": "t",
            "new_tokens": 13,
            "flips": [
                {"i": 5, "guided_word": "tulip", "target_word": "tr"},
                {"i": 9, "guided_word": "now", "target_word": "wo"},
            ],
        }
    ]
    f = flip_tags(rows, {"t": task}, {"t": "say tree"}, {"t": 1})
    assert f["n_flips"] == 2 and f["all"]["context_word"] == 0.5 and f["first"]["context_word"] == 1.0
    assert f["first"]["missed_context_word"] == 1.0 and f["fixed"]["n"] == 2 and f["broken"]["n"] == 0
    assert f["all"]["target_word_in_context"] == 0.5  # 'wo' starts 'word' in the user turn; 'tr' starts nothing


def test_matrix_batch_size_reaches_every_batchable_run(tmp_path, tiny_target_dir, tiny_readout_dir, tasks_file):
    out = tmp_path / "mb"
    argv = ["matrix", "--target", str(tiny_target_dir), "--readouts", str(tiny_readout_dir), "--tasks"]
    argv += [str(tasks_file), "--out", str(out), "--betas", "1", "--max-new-tokens", "4", "--baselines", ""]
    argv += ["--nulls", "noise,shuffle", "--no-ttt", "--no-adaptive", "--n-boot", "200", "--batch-size", "2"]
    argv += ["--chat-template-kwargs", '{"enable_thinking": false}']
    assert main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["settings"]["batch_size"] == 2 and s["settings"]["chat_template_kwargs"] == {"enable_thinking": False}
    sizes = {}
    for path in sorted((out / "sweep_aligned").glob("*/results.jsonl")):
        sizes[path.parent.name] = {json.loads(x).get("batch_size", 1) for x in path.read_text().splitlines()}
    # greedy, guided and the noise null decode together; the shuffled-readout null reads another task: batch 1
    assert sizes == {"guided_b0": {2}, "guided_b1": {2}, "noise_b1": {2}, "shuffle_b1": {1}}
    # the batch size is not a run setting: the same folder resumes at another batch size
    argv[argv.index("--batch-size") + 1] = "1"
    assert main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["settings"]["batch_size"] == 1
