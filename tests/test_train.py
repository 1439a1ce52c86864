import csv
import json
import math
import re
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import data
import qwen3
import train
from conftest import example

ROOT = Path(__file__).resolve().parent.parent


def run_args(synth, out_dir, *extra):
    return ["--model", "tiny", "--which_model", "base", "--data_path", str(synth), "--out_dir", str(out_dir),
            "--validation_size", "6", "--epochs", "2", "--log_every", "4", "--lr", "3e-3",
            "--cache_dir", str(Path(out_dir).parent / "cache"), *extra]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def losses(path):
    return [(r["epoch"], r["total_steps"], r["train_loss"], r["val_loss"], r["lr"]) for r in read_csv(path)]


def final_weights(run_dir):
    return qwen3.read_checkpoint(run_dir)["model"]


def test_training_run_logs_checkpoints_and_learns(synth, tmp_path):
    train.main(run_args(synth, tmp_path / "run", "--batch_size", "4"))
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert list(rows[0]) == train.CSV_COLUMNS
    steps_per_epoch = math.ceil(54 / 4)
    # a row every log_every (4) steps, plus one at each epoch end (after a log row of the same step)
    expected = sorted([(s, 0) for s in range(4, 2 * steps_per_epoch + 1, 4)]
                      + [(steps_per_epoch, 1), (2 * steps_per_epoch, 1)])
    assert [int(r["total_steps"]) for r in rows] == [s for s, _ in expected]
    assert float(rows[-1]["val_loss"]) < 0.85 * float(rows[0]["val_loss"])  # it learns
    assert all(r["train_ce"] == r["train_loss"] and r["train_kd"] == "" for r in rows)  # hard distillation
    names = sorted(p.name for p in (tmp_path / "run").glob("qwen3-*.pth"))
    assert names == [f"qwen3-tiny-distill-step{steps_per_epoch:05d}-epoch1.pth",
                     f"qwen3-tiny-distill-step{2 * steps_per_epoch:05d}-epoch2.pth"]
    model, tok, state = qwen3.load_checkpoint(tmp_path / "run" / names[-1])
    assert state["epoch"] == 2 and tok.kind == "base"
    assert state["val_loss"] == pytest.approx(float(rows[-1]["val_loss"]), abs=1e-6)
    assert state["elapsed_s"] == pytest.approx(float(rows[-1]["elapsed_s"]), abs=0.06)  # plot.py progress
    assert json.loads((tmp_path / "run" / "args.json").read_text())["batch_size"] == 4


def test_sigint_saves_a_checkpoint_and_resume_equals_uninterrupted(synth, tmp_path):
    schedule = ["--log_every", "2", "--dtype", "float32", "--lr_schedule", "cosine", "--warmup_steps", "5"]
    train.main(run_args(synth, tmp_path / "a", *schedule))
    proc = subprocess.Popen([sys.executable, "train.py", *run_args(synth, tmp_path / "b", *schedule)],
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
    assert losses(csv_path) == losses(tmp_path / "a" / "metrics.csv")  # the schedule continued exactly
    lrs = [float(r["lr"]) for r in read_csv(csv_path)]
    assert lrs[0] < lrs[1] and lrs[-1] == 0.0  # warmup, then a cosine decay to --min_lr (0) at the last step
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16-sr"])  # -sr: its random stream is resumed too
def test_resume_extends_a_finished_run_as_if_it_had_been_longer(synth, tmp_path, capsys, dtype):
    train.main(run_args(synth, tmp_path / "two", "--dtype", dtype, "--batch_size", "4"))
    train.main(run_args(synth, tmp_path / "one", "--dtype", dtype, "--batch_size", "4", "--epochs", "1"))
    train.main(["--resume", str(tmp_path / "one"), "--epochs", "2"])
    assert losses(tmp_path / "one" / "metrics.csv") == losses(tmp_path / "two" / "metrics.csv")
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert all(torch.equal(a[name], b[name]) for name in a)
    before = (tmp_path / "one" / "metrics.csv").read_text()
    capsys.readouterr()
    assert train.main(["--resume", str(tmp_path / "one")]) is None  # exits 0
    assert "is complete (2 epochs)" in capsys.readouterr().out
    assert (tmp_path / "one" / "metrics.csv").read_text() == before


def test_resume_refuses_flags_that_would_change_the_run(synth, tmp_path):
    train.main(run_args(synth, tmp_path / "run", "--epochs", "1"))
    before = (tmp_path / "run" / "metrics.csv").read_text()
    with pytest.raises(ValueError, match=r"--lr 0.003 -> 0.01, --batch_size 1 -> 2"):
        train.main(["--resume", str(tmp_path / "run"), "--lr", "1e-2", "--batch_size", "2", "--epochs", "2"])
    assert (tmp_path / "run" / "metrics.csv").read_text() == before


def test_learning_rate_schedules():
    args = Namespace(lr=1.0, min_lr=0.1, warmup_steps=4, lr_schedule="cosine")
    lrs = [train.learning_rate(step, 24, args) for step in range(24)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == 1.0 and lrs[-1] == pytest.approx(0.1)
    assert lrs[14] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 10 / 19)))
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    args.lr_schedule = "linear"
    assert [train.learning_rate(s, 24, args) for s in (4, 14, 23)] == pytest.approx(
        [1.0, 1 - 0.9 * 10 / 19, 0.1]
    )
    args.lr_schedule, args.warmup_steps = "constant", 0
    assert {train.learning_rate(s, 24, args) for s in range(24)} == {1.0}


@pytest.mark.parametrize("extra, match", [
    (["--warmup_steps", "1000"], "more than the run's"),
    (["--min_lr", "1"], "above --lr"),
    (["--kd_loss", "jsd", "--jsd_beta", "1.5", "--teacher", "tiny"], "jsd_beta"),
    (["--validation_size", "500"], "leaves no training examples"),
    (["--max_seq_len", "10"], "leaves no training examples"),
    (["--dtype", "bfloat16-sr", "--fsdp"], "bfloat16-sr with --fsdp is not supported"),
])
def test_bad_settings_fail_before_any_work_and_write_nothing(synth, tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        train.main(run_args(synth, tmp_path / "run") + extra)
    assert not (tmp_path / "run").exists()


def test_unknown_precision_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--dtype", "float16"])
    assert "invalid choice: 'float16'" in capsys.readouterr().err


@pytest.mark.parametrize("extra,error,match", [
    (["--data_path", "nowhere.json"], FileNotFoundError, "data file not found"),
    (["--data_path", "deepseek-r1-math-tran"], FileNotFoundError, "partition"),
])
def test_missing_data_fails_early_with_a_clear_error(synth, tmp_path, extra, error, match):
    with pytest.raises(error, match=match):
        train.main(run_args(synth, tmp_path / "run") + extra)


def test_refuses_to_overwrite_a_run_but_not_a_failed_start(synth, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text("{}")  # what a run that failed before its first checkpoint leaves
    (run / "metrics.csv").write_text("epoch,total_steps,train_loss,val_loss\n")
    train.main(run_args(synth, run, "--epochs", "1"))
    assert len(read_csv(run / "metrics.csv")) > 1
    with pytest.raises(ValueError, match="already holds a run: continue it with --resume"):
        train.main(run_args(synth, run))
    (run / "last.pth").unlink()
    with pytest.raises(ValueError, match="holds checkpoints: choose another --out_dir"):
        train.main(run_args(synth, run))


def test_answer_loss_equals_hand_computation():
    tok = qwen3.load_tokenizer("tiny", "base")
    model = qwen3.load_model("tiny", seed=2)
    e = example(tok, "1+1?", "2, so \\boxed{2}")
    ids = e["token_ids"].long()
    log_probs = torch.log_softmax(model(ids[None, :-1])[0].double(), -1)
    answer_positions = range(
        e["prompt_len"], len(ids)
    )  # each answer token (and eos), predicted from before it
    expected = -sum(log_probs[t - 1, ids[t]] for t in answer_positions) / len(answer_positions)
    ce, kd = train.answer_loss(model, [e], [1.0 / train.answer_len(e)], "cpu")
    assert ce.item() == pytest.approx(expected.item(), rel=1e-5) and kd.item() == 0


def step_loss(model, micro_batches, per_example_mean=False):
    return float(train.forward_backward(model, micro_batches, Namespace(per_example_mean=per_example_mean,
                                                                        kd_weight=0.0), "cpu")[0])


def test_batched_losses_match_per_example_losses_under_each_weighting():
    tok = qwen3.load_tokenizer("tiny", "base")
    model = qwen3.load_model("tiny", seed=3)
    batch = [example(tok, "1+1?", "2"), example(tok, "What is 7 times 6?", "It is 42, \\boxed{42}"),
             example(tok, "x?", "a longer answer " * 4)]
    singles = [step_loss(model, [[e]]) for e in batch]
    counts = [train.answer_len(e) for e in batch]
    assert step_loss(model, [batch], per_example_mean=True) == pytest.approx(sum(singles) / 3, rel=1e-5)
    token_mean = step_loss(model, [batch])
    assert token_mean == pytest.approx(sum(x * n for x, n in zip(singles, counts)) / sum(counts), rel=1e-5)
    assert step_loss(model, [batch[:1], batch[1:]]) == pytest.approx(token_mean, rel=1e-5)  # grad_accum 2


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_chunked_loss_equals_the_plain_full_logits_loss_in_value_and_gradient(dtype, tolerance):
    torch.manual_seed(0)
    model = qwen3.load_model("tiny", dtype=dtype, seed=4)
    tok = qwen3.load_tokenizer("tiny", "base")
    batch = [example(tok, "What is 3 + 4?", "3 + 4 = 7 " * 6), example(tok, "2?", "two"),
             example(tok, "Long question " * 3, "and a long answer " * 5)]
    weights = train.token_weights(batch, len(batch), sum(map(train.answer_len, batch)), False)
    train.answer_loss(model, batch, weights, "cpu", chunk_size=7)[0].backward()  # several chunks per batch
    chunked = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    plain = train.plain_answer_loss(model, batch, weights, "cpu")
    plain.backward()
    value = train.answer_loss(model, batch, weights, "cpu", chunk_size=7)[0]
    torch.testing.assert_close(value, plain, atol=tolerance / 10, rtol=tolerance / 10)
    for g, p in zip(chunked, model.parameters()):  # bfloat16: the chunks' head gradients round separately
        assert g.dtype == dtype and (g.float() - p.grad.float()).norm() <= tolerance * p.grad.float().norm()


def test_non_finite_loss_stops_names_the_step_and_does_not_block_the_rerun(synth, tmp_path, monkeypatch):
    real, calls = train.answer_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        losses = real(*args, **kwargs)
        return losses * float("nan") if len(calls) == 3 else losses  # at step 3, before any checkpoint
    monkeypatch.setattr(train, "answer_loss", poisoned)
    with pytest.raises(SystemExit, match=r"non-finite loss at step 3 .*data rows \[\d+\].*No checkpoint was "
                                         r"written: fix the cause and start again") as stop:
        train.main(run_args(synth, tmp_path / "run", "--log_every", "100"))
    assert "--resume" not in str(stop.value)
    monkeypatch.setattr(train, "answer_loss", real)
    train.main(run_args(synth, tmp_path / "run", "--epochs", "1"))  # the corrected rerun, same directory


def test_gradient_accumulation_token_budget_and_checkpointing_flags(synth, tmp_path):
    train.main(run_args(synth, tmp_path / "run", "--epochs", "1", "--batch_size", "4", "--grad_accum", "2",
                        "--tokens_per_batch", "600", "--per_example_mean", "--grad_checkpointing"))
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    examples, _, _ = data.prepare_examples(
        synth, qwen3.load_tokenizer("tiny", "base"), False, tmp_path / "cache"
    )
    train_examples, _ = data.split_examples(examples, 6, 42)
    batches = data.make_batches(train_examples, 4, 42 * 1000 + 1, 600, group=2)
    assert all(len(b) * max(len(e["token_ids"]) for e in b) <= 600 or len(b) == 1 for b in batches)
    assert int(rows[-1]["total_steps"]) == math.ceil(len(batches) / 2)
    assert math.isfinite(float(rows[-1]["val_loss"]))


def test_grad_checkpointing_and_compile_change_nothing_but_speed(synth, tmp_path):
    losses = {}
    for name, flags in (("plain", []), ("checkpointing", ["--grad_checkpointing"]),
                        ("compiled", ["--compile"])):
        train.main(run_args(synth, tmp_path / name, "--epochs", "1", "--batch_size", "4", *flags))
        losses[name] = [float(r[k]) for r in read_csv(tmp_path / name / "metrics.csv")
                        for k in ("train_loss", "val_loss")]
    assert len(losses["plain"]) > 6
    for name in ("checkpointing", "compiled"):
        assert losses[name] == pytest.approx(losses["plain"], rel=1e-4, abs=1e-5), name


def test_checkpoint_of_another_config_is_refused(synth, tmp_path):
    other = qwen3.Qwen3(qwen3.Qwen3Config(**{**qwen3.TINY.__dict__, "num_hidden_layers": 2}))
    qwen3.save_checkpoint(tmp_path / "other.pth", other, qwen3.load_tokenizer("tiny"))
    with pytest.raises(ValueError, match="different model config.*num_hidden_layers"):
        train.main(run_args(synth, tmp_path / "run", "--checkpoint_path", str(tmp_path / "other.pth")))
    (tmp_path / "corrupt.pth").write_bytes(b"\x80garbage")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        train.main(run_args(synth, tmp_path / "run2", "--checkpoint_path", str(tmp_path / "corrupt.pth")))


def test_no_valid_rows(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"problem": "x", "message_content": ""}, {"problem": "y"}]))
    with pytest.raises(ValueError, match="no valid rows.*1 empty message_content, 1 missing message_content"):
        train.main(run_args(bad, tmp_path / "run"))


# -----------------------------------------------------------------------------
# The real model's shapes and dtypes on the CPU: 0.6B widths, the 151,936-token vocabulary, 2 layers


@pytest.fixture(scope="module")
def real_width_batch():
    g = torch.Generator().manual_seed(0)
    # few tokens: on CPUs without bfloat16 matmul instructions, bfloat16 products take a slow generic kernel
    return [
        [
            {
                "token_ids": torch.randint(0, 151_936, (n,), generator=g, dtype=torch.int32),
                "prompt_len": n - 3,
                "row": i,
            }
            for i, n in enumerate((9, 7))
        ]
    ]


# bfloat16-sr: a weight moves one bfloat16 spacing with the probability update / spacing (0.08 a step here)
@pytest.mark.parametrize("mode, min_changed, max_changed", [("float32", 0.99, 1.0), ("bfloat16", 0.99, 1.0),
                                                           ("pure-bfloat16", 0.0, 0.5),
                                                           ("bfloat16-sr", 0.1, 0.6)])
def test_real_widths_train_save_and_generate_in_each_precision(
    mode, min_changed, max_changed, real_width_batch, tmp_path
):
    cfg = qwen3.Qwen3Config(num_hidden_layers=2)
    _, weights_dtype, autocast_dtype = train.pick_precision(mode, "cpu")
    torch.manual_seed(0)
    model = qwen3.Qwen3(cfg).to(weights_dtype)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = train.adamw(model.parameters(), "cpu", lr=1e-5, weight_decay=0.01, precision=mode)
    autocast = torch.autocast("cpu", autocast_dtype) if autocast_dtype else None
    step = Namespace(per_example_mean=False, kd_weight=0.0)
    for _ in range(3):  # train.py's own step: chunked answer loss, backward, clipping, AdamW
        ce = train.forward_backward(model, real_width_batch, step, "cpu", autocast=autocast)[0]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert math.isfinite(ce) and 8 < ce < 16  # about ln(151,936) = 11.9 at random init
    changed = sum((p != b).sum().item() for p, b in zip(model.parameters(), before)) / model.num_params()
    # lr 1e-5 moves a weight of 0.02 by far less than half its bfloat16 spacing (6e-5): kept in float32 master
    # weights, every update counts; in bfloat16 weights most are rounded away (norm weights, at 1.0, never
    # move)
    assert min_changed <= changed <= max_changed, changed
    tok = qwen3.load_tokenizer("tiny")
    path = qwen3.save_checkpoint(tmp_path / "c.pth", model, tok)
    loaded, _, state = qwen3.load_checkpoint(path, dtype=torch.bfloat16)  # evaluation's dtype
    assert state["model"]["norm.weight"].dtype == weights_dtype  # master weights are what the file keeps
    assert all(torch.equal(a.to(torch.bfloat16), b) for a, b in zip(model.state_dict().values(),
                                                                    loaded.state_dict().values()))
    answer = qwen3.generate(loaded, [[1, 2, 3, 4]], 3)[0]
    assert len(answer) == 3 and all(0 <= t < 151_936 for t in answer)


def test_stochastic_rounding_is_right_on_average():
    g = torch.Generator().manual_seed(0)
    spacing = 2.0 ** -7  # between bfloat16 neighbours in [1, 2)
    for start, share in ((1.0, 0.3), (-1.0, 0.3), (1.5, 0.01), (1.0, 0.0)):  # 0.0: exact, never moves
        exact = torch.full((100_000,), start + math.copysign(share * spacing, start))
        rounded32 = train.round_stochastic_(exact.clone(), g)
        rounded = rounded32.to(torch.bfloat16)
        assert torch.equal(rounded.float(), rounded32)  # bfloat16 values: the conversion is exact
        moved = (rounded.double() - start).abs() / spacing
        assert set(moved.unique().tolist()) <= {0.0, 1.0}  # only the two neighbours
        assert moved.mean().item() == pytest.approx(share, abs=0.005)  # up with the probability share


def test_bfloat16_sr_keeps_the_updates_that_float32_master_weights_make(real_width_batch):
    """Three AdamW steps at lr 1e-5 on the real widths from one start: the weights' movement, summed along the
    float32 master weights' movement, is about all of it with stochastic rounding and little of it with
    round-to-nearest (updates of about a tenth of the bfloat16 spacing)."""
    cfg = qwen3.Qwen3Config(num_hidden_layers=2)
    torch.manual_seed(0)
    start = qwen3.Qwen3(cfg).to(torch.bfloat16).state_dict()
    moved = {}
    for mode in ("bfloat16", "bfloat16-sr", "pure-bfloat16"):
        _, weights_dtype, autocast_dtype = train.pick_precision(mode, "cpu")
        model = qwen3.Qwen3(cfg).to(weights_dtype)
        model.load_state_dict(start)
        optimizer = train.adamw(model.parameters(), "cpu", lr=1e-5, weight_decay=0.01, precision=mode)
        autocast = torch.autocast("cpu", autocast_dtype) if autocast_dtype else None
        for _ in range(3):
            train.forward_backward(model, real_width_batch, Namespace(per_example_mean=False, kd_weight=0.0),
                                   "cpu", autocast=autocast)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        moved[mode] = torch.cat([(p.detach().double() - start[n].double()).flatten()
                                 for n, p in model.named_parameters()])
        del model, optimizer
    master = moved["bfloat16"]
    kept = {mode: (moved[mode] * master.sign()).sum().item() / master.abs().sum().item() for mode in moved}
    assert kept["bfloat16"] == 1.0
    assert 0.8 < kept["bfloat16-sr"] < 1.2, kept
    assert kept["pure-bfloat16"] < 0.5, kept


# -----------------------------------------------------------------------------
# Soft distillation


def test_kd_weight_zero_is_hard_distillation_to_the_bit(synth, tmp_path):
    train.main(run_args(synth, tmp_path / "hard", "--epochs", "1", "--batch_size", "4"))
    train.main(run_args(synth, tmp_path / "soft", "--epochs", "1", "--batch_size", "4", "--teacher", "tiny",
                        "--kd_weight", "0"))
    hard, soft = read_csv(tmp_path / "hard" / "metrics.csv"), read_csv(tmp_path / "soft" / "metrics.csv")
    assert [(r["train_loss"], r["val_loss"]) for r in hard] == [
        (r["train_loss"], r["val_loss"]) for r in soft
    ]
    assert all(float(r["train_kd"]) > 0 for r in soft)  # the KD term is still measured and logged
    a, b = final_weights(tmp_path / "hard"), final_weights(tmp_path / "soft")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_soft_distillation_resumes_exactly_with_accumulation(synth, tmp_path):
    soft = [
        "--teacher",
        "tiny",
        "--kd_weight",
        "0.5",
        "--kd_loss",
        "jsd",
        "--kd_temperature",
        "2",
        "--batch_size",
        "2",
        "--grad_accum",
        "2",
        "--dtype",
        "float32",
    ]
    train.main(run_args(synth, tmp_path / "two", *soft))
    train.main(run_args(synth, tmp_path / "one", *soft, "--epochs", "1"))
    train.main(["--resume", str(tmp_path / "one"), "--epochs", "2"])
    assert losses(tmp_path / "one" / "metrics.csv") == losses(tmp_path / "two" / "metrics.csv")
    rows = read_csv(tmp_path / "two" / "metrics.csv")
    for r in rows:  # the CSV keeps both terms: train_loss = (1 - w) CE + w KD
        assert float(r["train_loss"]) == pytest.approx(
            0.5 * float(r["train_ce"]) + 0.5 * float(r["train_kd"]), abs=2e-6
        )


def test_a_teacher_with_another_vocabulary_or_tokenizer_is_refused(synth, tmp_path):
    tok = qwen3.load_tokenizer("tiny", "base")
    other_size = qwen3.Qwen3(qwen3.Qwen3Config(**{**qwen3.TINY.__dict__, "vocab_size": 300}))
    qwen3.save_checkpoint(tmp_path / "size.pth", other_size, tok)
    other_tokens = json.loads(tok.json)
    other_tokens["model"]["vocab"] = {k: (v + 1) % 256 for k, v in other_tokens["model"]["vocab"].items()}
    qwen3.save_checkpoint(tmp_path / "tokens.pth", qwen3.load_model("tiny"),
                          qwen3.Tokenizer(json.dumps(other_tokens), "base"))
    for teacher in ("size.pth", "tokens.pth"):
        with pytest.raises(ValueError, match="another tokenizer or vocabulary"):
            train.main(run_args(synth, tmp_path / "run", "--teacher", str(tmp_path / teacher)))
        assert not (tmp_path / "run").exists()


def test_contaminated_rows_are_reported_and_dropped_only_with_decontaminate(tmp_path, capsys):
    rows, test = data.synth_dataset(60, 8, seed=3)
    for i, k in ((10, 0), (20, 1), (30, 2)):  # teacher rows whose problem is an evaluation problem
        rows[i] = {**rows[i], "problem": test[k]["problem"]}
    (tmp_path / "train.json").write_text(json.dumps(rows))
    (tmp_path / "test.json").write_text(json.dumps(test))
    (tmp_path / "other.json").write_text(json.dumps([{"problem": "Which planet is the largest?"}]))
    argv = lambda out, against, *extra: run_args(tmp_path / "train.json", tmp_path / out, "--epochs", "1",
                                                 "--against", str(tmp_path / against), *extra)
    train.main(argv("reported", "test.json"))
    out = capsys.readouterr().out
    assert "data: 60 rows, 60 usable, skipped: none; contaminated: 3 rows share a 10-word run with" in out
    assert "(row 10: 'what is" in out and "--decontaminate drops them" in out
    train.main(argv("clean", "other.json"))  # reporting changes nothing in what is trained
    assert "contaminated: none share a 10-word run" in capsys.readouterr().out
    assert losses(tmp_path / "reported" / "metrics.csv") == losses(tmp_path / "clean" / "metrics.csv")
    args = train.parse_args(argv("dropped", "test.json", "--decontaminate"))
    kept = train.load_examples(args, qwen3.load_tokenizer("tiny", "base"))
    assert sorted(e["row"] for part in kept for e in part) == sorted(set(range(60)) - {10, 20, 30})
    assert re.search(r"data: 60 rows, 57 usable, skipped: 3 contaminated \(.*test.json\); "
                     r"contaminated: 3 rows", capsys.readouterr().out)
