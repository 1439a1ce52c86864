import csv
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import qwen3
import train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    rows, _ = data.synth_dataset(60, 0, seed=1, min_terms=3, max_terms=4)
    (d / "train.json").write_text(json.dumps(rows))
    return d / "train.json"


def run_args(synth, out_dir, *extra):
    return ["--model", "tiny", "--which_model", "base", "--data_path", str(synth), "--out_dir", str(out_dir),
            "--validation_size", "6", "--epochs", "2", "--log_every", "4", "--lr", "3e-3",
            "--cache_dir", str(Path(out_dir).parent / "cache"), *extra]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_training_run_logs_checkpoints_and_learns(synth, tmp_path):
    train.main(run_args(synth, tmp_path / "run", "--batch_size", "4"))
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert list(rows[0])[:4] == ["epoch", "total_steps", "train_loss", "val_loss"]
    steps_per_epoch = math.ceil(54 / 4)
    # a row every log_every (4) steps, plus one at each epoch end (after a log row of the same step)
    expected = sorted([(s, 0) for s in range(4, 2 * steps_per_epoch + 1, 4)] + [(steps_per_epoch, 1), (2 * steps_per_epoch, 1)])
    assert [int(r["total_steps"]) for r in rows] == [s for s, _ in expected]
    assert float(rows[-1]["val_loss"]) < 0.85 * float(rows[0]["val_loss"])  # it learns
    names = sorted(p.name for p in (tmp_path / "run").glob("qwen3-*.pth"))
    assert names == [f"qwen3-tiny-distill-step{steps_per_epoch:05d}-epoch1.pth",
                     f"qwen3-tiny-distill-step{2 * steps_per_epoch:05d}-epoch2.pth"]
    model, tok, state = qwen3.load_checkpoint(tmp_path / "run" / names[-1])
    assert state["epoch"] == 2 and tok.kind == "base"
    assert state["val_loss"] == pytest.approx(float(rows[-1]["val_loss"]), abs=1e-6)
    assert json.loads((tmp_path / "run" / "args.json").read_text())["batch_size"] == 4


def test_sigint_saves_a_checkpoint_and_resume_equals_uninterrupted(synth, tmp_path):
    args = run_args(synth, tmp_path / "a", "--log_every", "2", "--dtype", "float32")
    train.main(args)
    proc = subprocess.Popen([sys.executable, "train.py", *run_args(synth, tmp_path / "b", "--log_every", "2")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    csv_path = tmp_path / "b" / "metrics.csv"
    while proc.poll() is None and not (csv_path.exists() and len(csv_path.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 130, output
    assert "interrupted: saved" in output and (tmp_path / "b" / "last.pth").exists()
    interrupted_rows = len(read_csv(csv_path))
    assert 2 <= interrupted_rows < len(read_csv(tmp_path / "a" / "metrics.csv"))
    train.main(["--resume", str(tmp_path / "b")])
    key = lambda rows: [(r["epoch"], r["total_steps"], r["train_loss"], r["val_loss"]) for r in rows]
    assert key(read_csv(csv_path)) == key(read_csv(tmp_path / "a" / "metrics.csv"))
    final = sorted((tmp_path / "a").glob("*epoch2.pth"))[0].name
    a, b = qwen3.read_checkpoint(tmp_path / "a" / final), qwen3.read_checkpoint(tmp_path / "b" / final)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name])


def example(tok, problem, answer):
    (e,), _ = data.build_examples([{"problem": problem, "message_content": answer}], tok, False)
    return e


def test_answer_loss_equals_hand_computation():
    tok = qwen3.load_tokenizer("tiny", "base")
    model = qwen3.load_model("tiny", seed=2)
    e = example(tok, "1+1?", "2, so \\boxed{2}")
    ids = e["token_ids"].long()
    log_probs = torch.log_softmax(model(ids[None, :-1])[0].double(), -1)
    answer_positions = range(e["prompt_len"], len(ids))  # each answer token (and eos), predicted from before it
    expected = -sum(log_probs[t - 1, ids[t]] for t in answer_positions) / len(answer_positions)
    loss, _ = train.step_loss(model, [[e]], False, "cpu", backward=False)
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_batched_losses_match_per_example_losses_under_each_weighting():
    tok = qwen3.load_tokenizer("tiny", "base")
    model = qwen3.load_model("tiny", seed=3)
    batch = [example(tok, "1+1?", "2"), example(tok, "What is 7 times 6?", "It is 42, \\boxed{42}"),
             example(tok, "x?", "a longer answer " * 4)]
    singles = [train.step_loss(model, [[e]], False, "cpu", backward=False)[0] for e in batch]
    counts = [len(e["token_ids"]) - e["prompt_len"] for e in batch]
    per_example, _ = train.step_loss(model, [batch], True, "cpu", backward=False)
    assert per_example == pytest.approx(sum(singles) / 3, rel=1e-5)
    token_mean, _ = train.step_loss(model, [batch], False, "cpu", backward=False)
    assert token_mean == pytest.approx(sum(l * n for l, n in zip(singles, counts)) / sum(counts), rel=1e-5)
    accumulated, _ = train.step_loss(model, [batch[:1], batch[1:]], False, "cpu", backward=False)  # grad_accum 2
    assert accumulated == pytest.approx(token_mean, rel=1e-5)


def test_refuses_to_overwrite_a_previous_run(synth, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text("epoch,total_steps,train_loss,val_loss\n1,1,1,1\n")
    with pytest.raises(ValueError, match="already holds a run"):
        train.main(run_args(synth, tmp_path / "run"))
    assert (tmp_path / "run" / "metrics.csv").read_text().endswith("1,1,1,1\n")


@pytest.mark.parametrize("extra,error,match", [
    (["--validation_size", "500"], ValueError, "leaves no training examples"),
    (["--data_path", "nowhere.json"], FileNotFoundError, "data file not found"),
    (["--data_path", "deepseek-r1-math-tran"], FileNotFoundError, "partition"),
    (["--max_seq_len", "10"], ValueError, "leaves no training examples"),
])
def test_bad_input_fails_early_with_a_clear_error(synth, tmp_path, extra, error, match):
    with pytest.raises(error, match=match):
        train.main(run_args(synth, tmp_path / "run") + extra)


def test_no_valid_rows(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"problem": "x", "message_content": ""}, {"problem": "y"}]))
    with pytest.raises(ValueError, match="no valid rows.*1 empty message_content, 1 missing message_content"):
        train.main(run_args(bad, tmp_path / "run"))


def test_checkpoint_of_another_config_is_refused(synth, tmp_path):
    other = qwen3.Qwen3(qwen3.Qwen3Config(**{**qwen3.TINY.__dict__, "num_hidden_layers": 2}))
    qwen3.save_checkpoint(tmp_path / "other.pth", other, qwen3.load_tokenizer("tiny"))
    with pytest.raises(ValueError, match="different model config.*num_hidden_layers"):
        train.main(run_args(synth, tmp_path / "run", "--checkpoint_path", str(tmp_path / "other.pth")))
    (tmp_path / "corrupt.pth").write_bytes(b"\x80garbage")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        train.main(run_args(synth, tmp_path / "run2", "--checkpoint_path", str(tmp_path / "corrupt.pth")))


def test_non_finite_loss_stops_and_names_the_step(synth, tmp_path, monkeypatch):
    real = qwen3.answer_loss
    calls = []
    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 70 else loss  # in epoch 2
    monkeypatch.setattr(qwen3, "answer_loss", poisoned)
    with pytest.raises(SystemExit, match=r"non-finite loss nan at step \d+ .*data rows \[\d+\].*Last good checkpoint: .*epoch1.pth"):
        train.main(run_args(synth, tmp_path / "run", "--log_every", "100"))


def test_gradient_accumulation_token_budget_and_checkpointing_flags(synth, tmp_path):
    train.main(run_args(synth, tmp_path / "run", "--epochs", "1", "--batch_size", "4", "--grad_accum", "2",
                        "--tokens_per_batch", "600", "--per_example_mean", "--grad_checkpointing"))
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    examples, _, _ = data.prepare_examples(synth, qwen3.load_tokenizer("tiny", "base"), False, tmp_path / "cache")
    train_examples, _ = data.split_examples(examples, 6, 42)
    batches = data.make_batches(train_examples, 4, 42 * 1000 + 1, 600)
    assert all(len(b) * max(len(e["token_ids"]) for e in b) <= 600 or len(b) == 1 for b in batches)
    assert int(rows[-1]["total_steps"]) == math.ceil(len(batches) / 2)
    assert math.isfinite(float(rows[-1]["val_loss"]))


def test_grad_checkpointing_and_compile_change_nothing_but_speed(synth, tmp_path):
    losses = {}
    for name, flags in (("plain", []), ("checkpointing", ["--grad_checkpointing"]), ("compiled", ["--compile"])):
        train.main(run_args(synth, tmp_path / name, "--epochs", "1", "--batch_size", "4", *flags))
        losses[name] = [float(r[k]) for r in read_csv(tmp_path / name / "metrics.csv") for k in ("train_loss", "val_loss")]
    assert len(losses["plain"]) > 6
    for name in ("checkpointing", "compiled"):
        assert losses[name] == pytest.approx(losses["plain"], rel=1e-4, abs=1e-5), name
