"""Asking a teacher for its answers (evaluate.py generate --api_base): a local OpenAI-compatible server
(conftest.TeacherServer, on 127.0.0.1) that fails in scripted ways; resume after a kill; the key kept secret;
rejection sampling (train.py --only_correct)."""
import csv
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import data
import evaluate
import qwen3
import teacher
import train
from conftest import TeacherServer, example

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-5ecret-KEY-0123456789"


def problems(tmp_path, n, name="problems.json"):
    rows = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i), "level": 1 + i % 3} for i in range(n)]
    (tmp_path / name).write_text(json.dumps(rows))
    return tmp_path / name, rows


def generate(server, data_path, out, *extra):
    return ["generate", "--api_base", server.url, "--api_model", "teacher", "--model", "tiny", "--data_path",
            str(data_path), "--out", str(out), *map(str, extra)]


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_every_fault_is_retried_and_each_answer_is_the_text_the_server_sent(teacher_server, tmp_path, capsys):
    path, rows = problems(tmp_path, 12)
    faults = [["429"], ["500", "502", "503"], ["slow"], ["cut"], ["badjson"], ["nochoices"], ["length"],
              ["503", "429", "cut"], [], [], [], []]
    styles = ["reasoning_content", "reasoning", "think"]
    for i, row in enumerate(rows):
        teacher_server.faults[row["problem"]] = list(faults[i])
        teacher_server.style[row["problem"]] = styles[i % 3]
        teacher_server.answers[row["problem"]] = row["answer"] if i % 4 else "wrong"  # 3 of 12 are wrong
    teacher_server.slow_s = 1.5
    out = tmp_path / "teacher.jsonl"
    summary = evaluate.main(generate(teacher_server, path, out, "--num_workers", "8", "--timeout", "0.5",
                                     "--teacher_json", str(tmp_path / "teacher.json"), "--price_in", "0.7",
                                     "--price_out", "2.5"))
    got = records(out)
    assert [r["index"] for r in got] == list(range(12))
    for r, row in zip(got, rows):
        thinking, content = teacher_server.text(row["problem"], None)
        assert r["message_thinking"] == thinking and r["problem"] == row["problem"]
        assert r["gtruth_answer"] == row["answer"]
        if r["index"] == 6:  # finish_reason length: what came, marked as cut
            assert r["message_content"] == content[:5] and r["truncated"] and r["finish_reason"] == "length"
        else:
            assert r["message_content"] == content and r["finish_reason"] == "stop"
            assert r["correct"] == (r["index"] % 4 != 0)
    tries = [sum(p == row["problem"] for _, p, _ in teacher_server.log) for row in rows]
    assert tries == [1 + len([x for x in f if x != "length"]) for f in faults]  # each fault retried
    # the default prompt is the reference's template, word for word, as one user message
    first = next(body for _, p, body in teacher_server.log if p == rows[0]["problem"])
    assert first["messages"] == [{"role": "user", "content": (
        "You are a helpful math assistant.\n"
        "Answer the question and write the final result on a new line as:\n\\boxed{ANSWER}\n\n"
        "Question:\nWhat is 0 + 0?\n\nAnswer:")}]
    assert first["temperature"] == 0.0 and first["max_tokens"] == 2048 and "seed" not in first
    assert summary["accuracy"] == pytest.approx(8 / 12) and summary["complete"]
    usage = summary["usage"]
    assert usage["prompt_tokens"] == sum(r["prompt_tokens"] for r in got) > 0
    cost = (usage["prompt_tokens"] * 0.7 + usage["completion_tokens"] * 2.5) / 1e6
    assert usage["cost_usd"] == pytest.approx(cost)
    assert set(summary["lengths"]) == {"thinking_tokens", "content_tokens", "num_tokens"}
    printed = capsys.readouterr().out
    assert "server tokens:" in printed and "per 1,000 answers" in printed
    # the records are a teacher file: the JSON array for sharing, data.py stats and train.py read them
    shared = json.loads((tmp_path / "teacher.json").read_text())
    fields = ("problem", "gtruth_answer", "message_thinking", "message_content")
    assert shared[3] == {k: got[3][k] for k in fields}
    tok = qwen3.load_tokenizer("tiny", "base")
    examples, skipped, n = data.prepare_examples(out, tok, True, cache_dir=tmp_path / "cache")
    assert n == 12 and len(examples) == 12
    train.main(["--model", "tiny", "--which_model", "base", "--data_path", str(out), "--out_dir",
                str(tmp_path / "run"), "--validation_size", "2", "--epochs", "1", "--use_think_tokens",
                "--only_correct", "--cache_dir", str(tmp_path / "cache")])
    printed = capsys.readouterr().out
    assert "only correct: kept 8 of 12, dropped 4" in printed, printed  # 3 wrong, 1 cut at the cap


@pytest.mark.parametrize("case, match", [
    ("wrong key", "HTTP 401.*refused the API key.*\\$OPENAI_API_KEY"),
    ("no key", "HTTP 401.*wants an API key: set \\$OPENAI_API_KEY"),
    ("unknown model", "HTTP 404.*does not exist.*check --api_model"),
    ("no server", "no server answers at .*: start it first"),
])
def test_errors_that_retrying_cannot_fix_stop_the_run_with_one_line(tmp_path, monkeypatch, case, match):
    server = TeacherServer(key=KEY)
    path, _ = problems(tmp_path, 20)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong" if case == "wrong key" else KEY)
    if case == "no key":
        monkeypatch.delenv("OPENAI_API_KEY")
    argv = generate(server, path, tmp_path / "out.jsonl", "--num_workers", "2")
    if case == "unknown model":
        argv[argv.index("teacher")] = "no-such-model"
    if case == "no server":
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            argv[argv.index(server.url)] = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    try:
        with pytest.raises(ValueError, match=match) as error:
            evaluate.main(argv)
    finally:
        server.close()
    assert "\n" not in str(error.value) and KEY not in str(error.value)
    assert len(server.log) <= 2 + 2  # at once: the requests in flight, not one per problem


def test_retry_after_and_backoff(monkeypatch):
    assert teacher._retry_after("3") == 3.0 and teacher._retry_after(None) is None
    assert teacher._retry_after("99999") == teacher.RETRY_AFTER_CAP_S
    assert 0 <= teacher._retry_after("Wed, 21 Oct 2015 07:28:00 GMT") <= 0.0  # a date in the past: now
    waits = []
    monkeypatch.setattr(teacher.time, "sleep", waits.append)
    server = TeacherServer()
    try:
        server.faults["x"] = ["429", "500", "500", "500"]
        client = teacher.ChatServer(server.url, "teacher", tries=5)
        reply = client.complete(data.render_prompt("x"), 64, qwen3.Sampling())
        assert reply.content == server.text("x", None)[1]
        assert waits[0] == 1.0  # Retry-After: 1
        caps = [min(teacher.RETRY_CAP_S, teacher.RETRY_BASE_S * 2 ** k) for k in range(1, 4)]
        assert len(waits) == 4 and all(0 <= w <= cap for w, cap in zip(waits[1:], caps))  # backoff, jitter
        server.faults["y"] = ["500"] * 3
        with pytest.raises(teacher.GaveUp, match="3 tries failed, the last: HTTP 500"):
            client = teacher.ChatServer(server.url, "teacher", tries=3)
            client.complete(data.render_prompt("y"), 64, qwen3.Sampling())
    finally:
        server.close()


@pytest.mark.parametrize("stop", ["SIGKILL", "SIGINT"])
def test_killed_at_a_random_moment_then_resumed_each_answer_exactly_once(tmp_path, stop):
    server = TeacherServer(key=KEY, delay=0.05)
    path, rows = problems(tmp_path, 40)
    out = tmp_path / "out.jsonl"
    argv = [sys.executable, "evaluate.py", *generate(server, path, out, "--num_workers", "8", "--num_samples",
                                                     "2", "--temperature", "1.0", "--seed", "7")]
    env = {**os.environ, "OPENAI_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    try:
        # Ctrl-C's default action for the child, even if this test runs where SIGINT is ignored (a shell's
        # background job), which the child would inherit and keep, as a program started with nohup should
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 120
        while time.time() < deadline and not (out.exists() and out.read_text().count("\n") >= 3):
            time.sleep(0.01)
        time.sleep(random.Random(stop).uniform(0, 0.4))  # a random moment, mid-run
        proc.send_signal(getattr(signal, stop))
        output = "".join(proc.communicate(timeout=120))
        assert proc.returncode != 0
        first = out.read_text()
        assert 3 <= first.count("\n") < 80
        if stop == "SIGINT":
            assert "interrupted;" in output and "continue with: python evaluate.py generate" in output
            assert output.rstrip().endswith("--resume")
        else:  # a kill may cut the line being written: make sure the resume sees one
            out.write_text(first + first.splitlines()[0][:30])
        resumed = subprocess.run([*argv, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=120)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
    finally:
        server.close()
    got = records(out)
    assert sorted((r["index"], r["sample"]) for r in got) == [(i, s) for i in range(40) for s in range(2)]
    seeds = {(p, body["seed"]) for _, p, body in server.log}
    for r in got:  # each with the text the server sent for its own (problem, sample)
        seed = qwen3.Sampling(1.0, seed=7).stream((r["index"], r["sample"])).randrange(2**31)
        assert (r["problem"], seed) in seeds
        assert (r["message_thinking"], r["message_content"]) == server.text(r["problem"], seed)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not any(KEY.encode() in p.read_bytes() for p in files)  # the key is in no file...
    assert KEY not in output + resumed.stdout + resumed.stderr  # ...and in no output


def test_split_thinking():
    assert evaluate.split_thinking("<think>\na\n</think>\n\nb") == ("a", "b")
    assert evaluate.split_thinking("a</think>b") == ("a", "b")  # the template opened it in the prompt
    assert evaluate.split_thinking("<think>cut off") == ("cut off", "")
    assert evaluate.split_thinking(" just an answer ") == ("", "just an answer")


def test_only_correct_on_the_real_r1_rows(shared_data, capsys):
    rows = json.loads((shared_data / "deepseek-r1-math-train-sample5.json").read_text())
    rows[2] = {**rows[2], "gtruth_answer": "not the answer"}
    rows += [rows[0], {**rows[1], "message_content": "So \\boxed{-1}."}]  # a second sample of two problems
    examples = [{"row": i} for i in range(len(rows))]
    kept = train.correct_only(examples, rows)
    assert [e["row"] for e in kept] == [0, 1, 3, 4, 5]
    assert "kept 5 of 7, dropped 2" in capsys.readouterr().out


def test_throughput_with_1_8_and_32_workers(tmp_path, capsys):
    """Measures (prints) answers per second against a server taking 0.5 s per request; asserts only that
    every answer arrived."""
    server = TeacherServer(delay=0.5)
    try:
        for workers, n in ((1, 8), (8, 32), (32, 128)):
            path, _ = problems(tmp_path, n, f"p{workers}.json")
            start = time.time()
            summary = evaluate.main(generate(server, path, tmp_path / f"w{workers}.jsonl", "--num_workers",
                                             str(workers)))
            seconds = time.time() - start
            assert summary["num_examples"] == n and summary["complete"]
            ideal = -(-n // workers) * 0.5
            with capsys.disabled():
                print(f"\n{workers} workers: {n} answers in {seconds:.2f} s = {n / seconds:.1f} answers/s "
                      f"({n / seconds / 2:.1f}x one worker's 2/s), overhead "
                      f"{1000 * (seconds - ideal) / n:.1f} ms per answer")
    finally:
        server.close()


def test_problem_sets_by_name_are_downloaded_once(tmp_path, file_server, monkeypatch):
    rows = [{"problem": "What is 1 + 1?", "answer": "2", "level": "Level 1", "type": "Algebra",
             "unique_id": "a"}]
    file_server.files["/math_full_minus_math500.json"] = json.dumps(rows).encode()
    monkeypatch.setitem(data.PROBLEM_SETS, "math-train", ("math_full_minus_math500.json",
                                                          file_server.url + "/math_full_minus_math500.json"))
    assert data.load_problems("math-train", tmp_path)[0]["answer"] == "2"
    file_server.close()
    assert data.load_problems("math-train", tmp_path) == rows  # cached: no request
    teacher_rows = [{"problem": "x?", "gtruth_answer": "3", "message_content": "\\boxed{3}"}]
    (tmp_path / "teacher.json").write_text(json.dumps(teacher_rows))
    assert data.load_problems(tmp_path / "teacher.json")[0]["answer"] == "3"  # a teacher file's problems


def test_problems_that_overlap_the_evaluation_set_are_named_before_the_first_request(tmp_path, capsys):
    path, rows = problems(tmp_path, 6)
    evaluation = [{"problem": "Which planet?"}, {"problem": rows[2]["problem"]}]
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    with socket.socket() as s:  # a port nobody listens on: the first request fails at once
        s.bind(("127.0.0.1", 0))
        server = Namespace(url=f"http://127.0.0.1:{s.getsockname()[1]}/v1")
        with pytest.raises(ValueError, match="no server answers"):
            evaluate.main(generate(server, path, tmp_path / "o.jsonl", "--against", tmp_path / "eval.json"))
    assert re.search(r"warning: 1 rows share a 10-word run with .*eval.json \(row 2: 'what is 2 2' "
                     r"\(.*eval.json problem 1\)\): answers to them would make a student score higher there",
                     capsys.readouterr().out)


def test_a_server_run_without_the_students_tokenizer_writes_records_and_a_summary(
        teacher_server, file_server, tmp_path, monkeypatch, capsys):
    # the student's tokenizer is not to be had: the Hub answers 404
    monkeypatch.setattr(qwen3, "HF_URL", file_server.url + "/{repo}/resolve/main/{file}")
    path, rows = problems(tmp_path, 4)
    argv = generate(teacher_server, path, tmp_path / "out.jsonl", "--cache_dir", str(tmp_path / "cache"))
    argv[argv.index("tiny")] = "Org/Unreachable"
    summary = evaluate.main(argv)
    got = records(tmp_path / "out.jsonl")
    assert len(got) == 4 and all(r["num_tokens"] == r["completion_tokens"] > 0 for r in got)
    assert not {"thinking_tokens", "content_tokens", "looped"} & set(got[0])
    assert summary["complete"] and set(summary["lengths"]) == {"num_tokens"} and "looped_share" not in summary
    assert summary["protocol"]["tokenizer"] is None
    assert "note: no thinking_tokens, content_tokens, looped in the records" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Soft targets: a teacher model in memory, or a file of its top-k log-probabilities


def plain_divergence(student_logits, teacher_logits, kind, T, beta):
    """KL / JSD written out from the definitions on full softmaxes, in float64."""
    q, p = torch.softmax(student_logits.double() / T, -1), torch.softmax(teacher_logits.double() / T, -1)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)
    if kind == "forward_kl":
        return kl(p, q) * T * T
    if kind == "reverse_kl":
        return kl(q, p) * T * T
    m = beta * p + (1 - beta) * q
    return (beta * kl(p, m) + (1 - beta) * kl(q, m)) * T * T


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_kd_equals_the_full_softmax_definition_in_value_and_gradient(kind, temperature):
    tok = qwen3.load_tokenizer("tiny", "base")
    student = qwen3.load_model("tiny", seed=1)
    soft = teacher.Teacher("tiny", tok, student.cfg.vocab_size, teacher.KD(kind, temperature, 0.3), "cpu")
    batch = [example(tok, "What is 3 + 4?", "3 + 4 = 7"), example(tok, "2?", "two, as a longer answer")]
    weights = train.token_weights(batch, len(batch), sum(map(train.answer_len, batch)), False)
    _, kd = train.answer_loss(student, batch, weights, "cpu", soft=soft, chunk_size=5)
    kd.backward()
    chunked = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    input_ids, _, mask = data.collate(batch)
    token_weights = torch.repeat_interleave(torch.tensor(weights), mask.sum(1)).double()
    with torch.no_grad():
        teacher_logits = soft.model(input_ids)[mask]
    expected = (plain_divergence(student(input_ids)[mask], teacher_logits, kind, temperature, 0.3)
                * token_weights).sum()
    expected.backward()
    assert kd.item() == pytest.approx(expected.item(), rel=1e-4) and kd.item() > 1e-3
    for g, p in zip(chunked, student.parameters()):
        torch.testing.assert_close(g, p.grad.float(), atol=1e-6, rtol=1e-4)


def test_top_k_teacher_logits_equal_the_online_teacher_when_k_covers_the_vocabulary(synth, tmp_path):
    teacher_model = qwen3.load_model("tiny", seed=9)
    tok = qwen3.load_tokenizer("tiny", "base")
    teacher_path = qwen3.save_checkpoint(tmp_path / "teacher.pth", teacher_model, tok)
    data.main(
        [
            "teacher-logits",
            "--teacher",
            str(teacher_path),
            "--top_k",
            "320",
            "--data_path",
            str(synth),
            "--which_model",
            "base",
            "--out",
            str(tmp_path / "logits.pt"),
            "--cache_dir",
            str(tmp_path / "c"),
        ]
    )
    kd = teacher.KD("reverse_kl", 2.0)
    examples, _, _ = data.prepare_examples(synth, tok, False, tmp_path / "c")
    online = teacher.Teacher(str(teacher_path), tok, 320, kd, "cpu")
    offline = teacher.read_logits(tmp_path / "logits.pt", synth, tok, False, kd=kd)
    offline.check_covers(examples)
    student = qwen3.load_model("tiny", seed=1)
    batch = examples[3:6]
    results = []
    for soft in (online, offline):
        student.zero_grad()
        weights = train.token_weights(batch, len(batch), sum(map(train.answer_len, batch)), False)
        _, kd = train.answer_loss(student, batch, weights, "cpu", soft=soft)
        kd.backward()
        results.append((kd.item(), [p.grad.clone() for p in student.parameters()]))
    (value_on, grads_on), (value_off, grads_off) = results
    assert value_off == pytest.approx(value_on, rel=2e-3)  # the file keeps log-probabilities in float16
    for a, b in zip(grads_on, grads_off):
        assert (a - b).norm() <= 2e-2 * a.norm()
    # and train.py runs from the file alone
    train.main(["--model", "tiny", "--which_model", "base", "--data_path", str(synth), "--out_dir",
                str(tmp_path / "run"), "--validation_size", "6", "--epochs", "1", "--log_every", "4",
                "--lr", "3e-3", "--teacher_logits", str(tmp_path / "logits.pt"),
                "--cache_dir", str(tmp_path / "c")])
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        assert all(float(r["train_kd"]) > 0 for r in csv.DictReader(f))


def test_teacher_logits_resume_from_finished_parts_and_refuse_other_data(tmp_path, monkeypatch):
    rows, _ = data.synth_dataset(40, 0, seed=5)
    (tmp_path / "t.json").write_text(json.dumps(rows))
    teacher_path = qwen3.save_checkpoint(tmp_path / "teacher.pth", qwen3.load_model("tiny", seed=3),
                                         qwen3.load_tokenizer("tiny", "base"))
    argv = lambda out: [
        "teacher-logits",
        "--teacher",
        str(teacher_path),
        "--top_k",
        "8",
        "--data_path",
        str(tmp_path / "t.json"),
        "--which_model",
        "base",
        "--batch_size",
        "3",
        "--out",
        str(out),
        "--cache_dir",
        str(tmp_path / "c"),
    ]
    monkeypatch.setattr(teacher, "PART_EXAMPLES", 16)  # three parts: 16 + 16 + 8 examples
    data.main(argv(tmp_path / "full.pt"))
    calls, real = [], teacher.top_k

    def failing(model, batch, *args, **kwargs):
        calls.append(len(batch))
        if len(calls) == 8:  # in the second part
            raise KeyboardInterrupt
        return real(model, batch, *args, **kwargs)
    monkeypatch.setattr(teacher, "top_k", failing)
    with pytest.raises(KeyboardInterrupt):
        data.main(argv(tmp_path / "cut.pt"))
    assert [p.name for p in sorted((tmp_path / "cut.pt.parts").iterdir())] == ["00000.pt"]
    calls.clear()
    monkeypatch.setattr(teacher, "top_k", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    data.main(argv(tmp_path / "cut.pt"))
    assert sum(calls) == 24 and not (tmp_path / "cut.pt.parts").exists()  # the first part was not redone
    full, cut = (torch.load(tmp_path / f, weights_only=True) for f in ("full.pt", "cut.pt"))
    assert full.keys() == cut.keys() and all(
        torch.equal(full[k], cut[k]) for k in ("rows", "ids", "logprobs")
    )
    tok = qwen3.load_tokenizer("tiny", "base")
    logits = teacher.read_logits(tmp_path / "full.pt", tmp_path / "t.json", tok, False)
    ids, logprobs, rest = logits.example(rows.index(rows[0]))
    assert ids.shape[1] == 8 and (logprobs[:, :-1] >= logprobs[:, 1:]).all() and (rest.exp() < 1).all()
    with pytest.raises(ValueError, match="computed for other data, tokenizer or formatting"):
        teacher.read_logits(tmp_path / "full.pt", tmp_path / "t.json", tok, True)  # --use_think_tokens
    with pytest.raises(ValueError, match="not a teacher-logits file"):
        teacher.read_logits(teacher_path, tmp_path / "t.json", tok, False)
