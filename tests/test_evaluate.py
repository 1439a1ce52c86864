"""evaluate.py: batched generation, records, resume, summaries with error bars, the grade command."""
import json

import pytest
import torch

import data
import evaluate
import qwen3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    model, tok = qwen3.load_model("tiny", seed=11), qwen3.load_tokenizer("tiny", "base")
    path = qwen3.save_checkpoint(d / "c.pth", model, tok)
    _, test = data.synth_dataset(0, 7, seed=3)
    (d / "test.json").write_text(json.dumps(test))
    return path, d / "test.json"


def run_eval(checkpoint, out, *extra):
    path, test = checkpoint
    evaluate.main(
        [
            "generate",
            "--checkpoint_path",
            str(path),
            "--data_path",
            str(test),
            "--max_new_tokens",
            "12",
            "--out",
            str(out),
            *extra,
        ]
    )
    return untimed(out), json.loads(out.with_suffix(".summary.json").read_text())


def untimed(path):
    """The records of a file without their time taken (the one field that differs between equal runs)."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in path.read_text().splitlines()]


def test_batched_evaluation_equals_batch_size_one(checkpoint, tmp_path):
    one, summary_one = run_eval(checkpoint, tmp_path / "one.jsonl", "--batch_size", "1")
    many, summary_many = run_eval(checkpoint, tmp_path / "many.jsonl", "--batch_size", "4")
    by_index = lambda records: {r["index"]: r["generated_text"] for r in records}
    assert by_index(one) == by_index(many) and len(one) == 7
    record = one[0]
    assert {
        "index",
        "sample",
        "unique_id",
        "subject",
        "level",
        "problem",
        "gtruth_answer",
        "generated_text",
        "extracted",
        "correct",
        "num_tokens",
        "truncated",
        "looped",
        "boxed",
        "thought_cut",
    } <= set(record)
    assert [(r["index"], r["sample"]) for r in one] == [
        (i, 0) for i in range(7)
    ]  # in order, whatever the batch
    assert summary_one["num_examples"] == 7 and summary_one["accuracy"] == summary_one["num_correct"] / 7
    assert set(summary_one["by_subject"]) == {r["subject"] for r in one}


def test_the_command_before_subcommands_still_generates(checkpoint, tmp_path, capsys):
    path, test = checkpoint
    old_form = ["--checkpoint_path", str(path), "--data_path", str(test), "--max_new_tokens", "12"]
    evaluate.main([*old_form, "--out", str(tmp_path / "old.jsonl")])  # as the README wrote it before
    evaluate.main(["generate", *old_form, "--out", str(tmp_path / "new.jsonl")])
    assert untimed(tmp_path / "old.jsonl") == untimed(tmp_path / "new.jsonl") != []
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--help"])
    assert "Without a command: generate" in capsys.readouterr().out


def test_resume_generates_only_the_unfinished_problems(checkpoint, tmp_path, monkeypatch):
    full, _ = run_eval(checkpoint, tmp_path / "full.jsonl")
    partial = tmp_path / "partial.jsonl"
    lines = (tmp_path / "full.jsonl").read_text().splitlines()
    partial.write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])  # three records and a cut-off fourth
    with pytest.raises(ValueError, match="exists"):
        run_eval(checkpoint, partial)
    generated = []
    real = qwen3.generate_stream
    monkeypatch.setattr(
        qwen3,
        "generate_stream",
        lambda model, prompts, *a, **k: generated.extend(prompts) or real(model, prompts, *a, **k),
    )
    resumed, summary = run_eval(checkpoint, partial, "--resume")
    assert len(generated) == 4
    assert sorted(resumed, key=lambda r: r["index"]) == sorted(full, key=lambda r: r["index"])
    assert summary["num_examples"] == 7


def test_rows_outside_the_math500_schema_are_refused(checkpoint, tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"problem": "1+1?", "answer": "2"}, {"question": "x"}]))
    with pytest.raises(ValueError, match="row 1 lacks a 'problem'"):
        run_eval((checkpoint[0], tmp_path / "bad.json"), tmp_path / "o.jsonl")


def test_grading_a_file_of_generations(tmp_path, capsys):
    rows = [
        {"gtruth_answer": "2", "message_content": r"so \boxed{2}"},
        {"gtruth_answer": "3", "message_content": r"\boxed{4}"},
        {"gtruth_answer": r"\frac12", "message_content": r"it is $\boxed{0.5}$"},
        {"gtruth_answer": "1", "message_content": None},
    ]
    (tmp_path / "gen.json").write_text(json.dumps(rows))
    evaluate.main(["grade", str(tmp_path / "gen.json"), "--generated_text", "message_content",
                   "--out", str(tmp_path / "graded.jsonl")])
    summary = json.loads((tmp_path / "graded.summary.json").read_text())
    assert (summary["num_correct"], summary["num_examples"]) == (2, 4)
    assert "accuracy (pass@1): 50.0% ± 28.9 (standard error)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no field 'answer_text'"):
        evaluate.main(["grade", str(tmp_path / "gen.json"), "--generated_text", "answer_text"])


def test_wilson_interval():
    low, high = evaluate.wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    assert evaluate.wilson_interval(0, 10)[0] == 0.0


@pytest.mark.parametrize(
    "stop, message",
    [
        (torch.OutOfMemoryError("CUDA out of memory"), "out of memory.*lower --batch_size"),
        (KeyboardInterrupt(), "interrupted"),
    ],
)
def test_a_stopped_evaluation_keeps_finished_records_for_resume(
    checkpoint, tmp_path, monkeypatch, stop, message
):
    full, _ = run_eval(checkpoint, tmp_path / "full.jsonl", "--batch_size", "2")
    calls, real = [], qwen3.Qwen3.forward

    def forward_then_stop(self, *a, **k):  # decoding stops after the first two answers are complete
        calls.append(1)
        if len(calls) > 15:
            raise stop
        return real(self, *a, **k)

    monkeypatch.setattr(qwen3.Qwen3, "forward", forward_then_stop)
    out = tmp_path / "stopped.jsonl"
    with pytest.raises(SystemExit, match=message + ".*2 finished answers.*--resume"):
        run_eval(checkpoint, out, "--batch_size", "2")
    assert len(out.read_text().splitlines()) == 2
    monkeypatch.setattr(qwen3.Qwen3, "forward", real)
    resumed, _ = run_eval(checkpoint, out, "--batch_size", "2", "--resume")
    assert sorted(resumed, key=lambda r: r["index"]) == sorted(full, key=lambda r: r["index"])


def test_pass_at_k_and_majority_vote_against_hand_computed_cases():
    assert evaluate.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert evaluate.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert evaluate.pass_at_k(4, 0, 4) == 0.0 and evaluate.pass_at_k(4, 2, 3) == 1.0
    answers = lambda *xs: [
        {"index": 0, "sample": i, "extracted": x, "correct": x == "1/2"} for i, x in enumerate(xs)
    ]
    # 0.5 and \frac12 are one answer to the checker: they outvote the two 3s
    assert evaluate.majority_answer(answers("3", "0.5", r"\frac{1}{2}", "3", "1/2"))["extracted"] == "0.5"
    assert evaluate.majority_answer(answers("3", "1/2"))["extracted"] == "3"  # a tie: the first answer wins
    assert evaluate.majority_answer(answers(None, None)) is None
    records = (answers("1/2", "3", "3", "4") + [{**r, "index": 1} for r in answers("1/2", "1/2", "7", None)])
    for r in records:
        r.update(subject="A", level=1)
    s = evaluate.summarize(records)
    assert s["accuracy"] == pytest.approx((1 / 4 + 2 / 4) / 2) and s["num_samples"] == 4
    assert s["stderr"] == pytest.approx(abs(0.25 - 0.5) / 2)  # sample std of (0.25, 0.5) / sqrt(2)
    assert s["maj@4"] == pytest.approx(0.5)  # problem 0 votes 3, problem 1 votes 1/2
    assert s["pass@k"][2] == pytest.approx(((1 - 3 / 6) + (1 - 1 / 6)) / 2)
    assert s["pass@k"][4] == 1.0 and s["by_level"]["1"]["accuracy"] == s["accuracy"]


def test_loops_are_detected_at_the_tail_only():
    assert evaluate.ends_in_loop([5] * 300)
    assert evaluate.ends_in_loop(list(range(100)) + [1, 2, 3, 4, 5, 6, 7] * 40)
    assert evaluate.ends_in_loop(list(range(400)) + list(range(50)) * 4)  # period 50, four times: the limit
    assert not evaluate.ends_in_loop(list(range(400)))
    assert not evaluate.ends_in_loop([1, 2, 3] * 100 + list(range(100)))  # looped once, then went on
    assert not evaluate.ends_in_loop([7] * 150)  # too short to call it a loop
    assert not evaluate.ends_in_loop(
        list(range(300)) + list(range(60)) * 3
    )  # a period of 60 is no tight loop


def test_sampled_evaluation_reports_error_bars_and_resumes_only_with_the_same_protocol(checkpoint, tmp_path):
    flags = ["--preset", "thinking", "--num_samples", "3", "--batch_size", "4"]
    records, summary = run_eval(checkpoint, tmp_path / "s.jsonl", *flags)
    assert len(records) == 21 and {r["sample"] for r in records} == {0, 1, 2}
    assert summary["num_samples"] == 3 and "maj@3" in summary and set(summary["pass@k"]) == {"1", "2", "3"}
    assert summary["protocol"]["temperature"] == 0.6 and summary["protocol"]["top_k"] == 20
    again, _ = run_eval(checkpoint, tmp_path / "b1.jsonl", *flags[:-1], "1")  # batch size 1: the same answers
    assert [r["generated_text"] for r in again] == [r["generated_text"] for r in records]
    before = (tmp_path / "s.jsonl").read_text()
    with pytest.raises(ValueError, match="other settings.*'temperature': \\(0.6, 0.9\\)"):
        run_eval(checkpoint, tmp_path / "s.jsonl", *flags, "--temperature", "0.9", "--resume")
    assert (tmp_path / "s.jsonl").read_text() == before


@pytest.mark.parametrize("flags, match", [(["--top_p", "1.5"], "top_p"),
                                          (["--temperature", "-1"], "temperature"),
                                          (["--num_samples", "0"], "num_samples"),
                                          (["--thinking_budget", "100"], "thinking_budget")])
def test_bad_decoding_settings_are_refused_before_anything_is_written(checkpoint, tmp_path, flags, match):
    with pytest.raises(ValueError, match=match):
        run_eval(checkpoint, tmp_path / "x.jsonl", *flags)
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "x.summary.json").exists()


def test_thinking_budget_is_recorded(checkpoint, tmp_path):
    path, test = checkpoint
    records, summary = run_eval(
        checkpoint, tmp_path / "t.jsonl", "--thinking_budget", "4", "--answer_budget", "3"
    )
    # the tiny random model never writes <think>: nothing to cut, and the answers are the plain ones
    plain, _ = run_eval(checkpoint, tmp_path / "p.jsonl")
    assert [r["generated_text"] for r in records] == [r["generated_text"] for r in plain]
    assert summary["thought_cut_share"] == 0.0 and summary["protocol"]["thinking_budget"] == 4
