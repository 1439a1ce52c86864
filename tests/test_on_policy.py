"""On-policy distillation (train.py --on_policy): the student answers, the teacher scores every token."""
import csv
import json
import math
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F

import data
import qwen3
import teacher
import train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("onpolicy")
    rows, _ = data.synth_dataset(40, 0, seed=4)
    (d / "train.json").write_text(json.dumps(rows))
    (d / "problems.json").write_text(json.dumps([{"problem": r["problem"], "answer": r["gtruth_answer"]}
                                                 for r in rows]))
    teacher = qwen3.save_checkpoint(d / "teacher.pth", qwen3.load_model("tiny", seed=5),
                                    qwen3.load_tokenizer("tiny", "base"))
    return d, teacher


def run_args(setup, out, *extra):
    d, teacher = setup
    return ["--model", "tiny", "--which_model", "base", "--data_path", str(d / "train.json"), "--out_dir",
            str(out), "--validation_size", "4", "--epochs", "2", "--log_every", "3", "--lr", "3e-3",
            "--batch_size", "2", "--dtype", "float32", "--teacher", str(teacher), "--kd_loss", "reverse_kl",
            "--rollout_max_new_tokens", "12", "--cache_dir", str(d / "cache"), *extra]


def rows_of(out):
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def rollouts_of(student, tok, max_new_tokens=10, samples=2):
    return teacher.Rollouts(student, tok, torch.float32, share=1.0, temperature=1.0,
                            max_new_tokens=max_new_tokens, samples=samples, seed=3)


def examples(setup, n):
    tok = qwen3.load_tokenizer("tiny", "base")
    return data.prepare_examples(setup[0] / "train.json", tok, False, setup[0] / "cache")[0][:n], tok


def written(share):
    return {(e["row"], i): e["token_ids"].tolist() for batch, _, mine in share if mine
            for i, e in enumerate(batch)}


def test_rollouts_do_not_depend_on_the_batch_size_or_the_processes(setup):
    batch, tok = examples(setup, 8)
    student = qwen3.load_model("tiny", seed=1)
    rollouts = rollouts_of(student, tok)
    by_sample = {}
    for size in (1, 4, 8):
        share = [([*batch[i:i + size]], 1.0, False) for i in range(0, 8, size)]
        new, stats = rollouts.answer(student, share, 1)
        got = sorted(e["token_ids"].tolist() for b, _, mine in new if mine for e in b)
        by_sample[size] = got
        assert stats["answers"] == 16 and len(got) == 16
    assert by_sample[1] == by_sample[4] == by_sample[8]
    two = []  # two processes: each answers its own share of the micro-batches
    micro_batches = [batch[i:i + 2] for i in range(0, 8, 2)]
    for rank in (0, 1):
        share = [(b, w, False) for b, w in train.rank_share(micro_batches, rank, 2)]
        two += [e["token_ids"].tolist() for b, _, mine in rollouts.answer(student, share, 1)[0]
                if mine for e in b]
    assert sorted(two) == by_sample[1]
    again = rollouts.answer(student, [(batch, 1.0, False)], 2)[0]  # another epoch: other draws
    assert sorted(e["token_ids"].tolist() for b, _, mine in again if mine for e in b) != by_sample[1]


def test_on_policy_loss_is_the_reverse_kl_over_the_students_own_answer(setup):
    batch, tok = examples(setup, 3)
    student, teacher_model = qwen3.load_model("tiny", seed=1), qwen3.load_model("tiny", seed=5)
    args = Namespace(per_example_mean=False, kd_weight=0.5)
    soft = teacher.Teacher(str(setup[1]), tok, 320, teacher.KD("reverse_kl"), "cpu")
    rollouts = rollouts_of(student, tok, max_new_tokens=16, samples=1)
    ce, kd, tokens, stats = train.forward_backward(student, [batch], args, "cpu", soft=soft,
                                                   rollouts=rollouts)
    grads = [p.grad.clone() for p in student.parameters()]
    # the plain way: full logits over prompt + the student's answer, reverse KL at each answer position
    answers = [e for b, _, mine in rollouts.answer(student, [(batch, 1.0, False)], 1)[0] if mine
               for e in b]
    student.zero_grad()
    total, count = 0.0, sum(train.answer_len(e) for e in answers)
    for e in answers:
        ids = e["token_ids"].long()[None]
        positions = slice(e["prompt_len"] - 1, ids.shape[1] - 1)
        s = F.log_softmax(student(ids[:, :-1])[0, positions].float(), -1)
        with torch.no_grad():
            t = F.log_softmax(teacher_model(ids[:, :-1])[0, positions].float(), -1)
        total = total + (s.exp() * (s - t)).sum()
    (total / count).backward()
    assert ce == 0 and kd == 0  # no teacher text in this step: all of it is the student's
    assert stats["kd"] == pytest.approx((total / count).item(), rel=1e-5)
    assert stats["kd_per_token"] / stats["tokens"] == pytest.approx((total / count).item(), rel=1e-5)
    for a, b in zip(grads, (p.grad for p in student.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16-sr"])  # with soft KD on the other half of each step
def test_resume_reproduces_the_uninterrupted_run_and_the_log_has_the_rollouts(setup, tmp_path, dtype):
    train.main(run_args(setup, tmp_path / "full", "--on_policy", "0.5", "--dtype", dtype))
    train.main(run_args(setup, tmp_path / "part", "--on_policy", "0.5", "--dtype", dtype, "--epochs", "1"))
    train.main(["--resume", str(tmp_path / "part"), "--epochs", "2"])
    full, part = rows_of(tmp_path / "full"), rows_of(tmp_path / "part")
    losses = ("epoch", "total_steps", "train_loss", "val_loss", "train_ce", "train_kd", "rollout_len",
              "rollout_cut", "rollout_boxed", "rollout_kd")
    assert [[r[k] for k in losses] for r in full] == [[r[k] for k in losses] for r in part]
    logged = [r for r in full if r["rollout_len"]]  # (an epoch's last row right after a regular one has none)
    assert len(logged) >= len(full) - 2
    assert all(0 < float(r["rollout_len"]) <= 12 and 0 <= float(r["rollout_cut"]) <= 1 for r in logged)
    assert all(float(r["rollout_s"]) > 0 and float(r["teacher_s"]) > 0 and r["update_s"] for r in logged)
    a, b = (qwen3.read_checkpoint(tmp_path / n)["model"] for n in ("full", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("soft", [False, True])
def test_on_policy_0_trains_as_the_plain_loop_without_rollouts_to_the_bit(setup, tmp_path, soft):
    """The off setting is today's hard or soft training: train.py's weights equal those of a bare loop over
    the same steps (loss, backward, AdamW), with no rollout code anywhere in it."""
    argv = run_args(setup, tmp_path / "run", "--on_policy", "0", "--epochs", "1", "--kd_loss", "forward_kl")
    if not soft:
        del argv[argv.index("--teacher"):argv.index("--teacher") + 2]
    train.main(argv)
    args, tok = train.parse_args(argv), qwen3.load_tokenizer("tiny", "base")
    model = qwen3.load_model("tiny", seed=args.seed)
    kd = teacher.KD(args.kd_loss, args.kd_temperature, args.jsd_beta)
    soft_targets = teacher.Teacher(args.teacher, tok, 320, kd, "cpu") if soft else None
    examples, _ = train.load_examples(args, tok, say=lambda *a: None)
    optimizer = train.adamw(model.parameters(), "cpu", args.lr, args.weight_decay)
    steps = train.optimizer_steps(examples, args, 1, 1)
    model.train()
    for step, micro_batches in enumerate(steps):
        tokens = sum(train.answer_len(e) for batch in micro_batches for e in batch)
        for batch in micro_batches:
            ce, kd = train.answer_loss(model, batch, [1 / tokens] * len(batch), "cpu", soft_targets)
            (0.5 * ce + 0.5 * kd if soft else ce).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    trained = qwen3.read_checkpoint(tmp_path / "run")["model"]
    assert all(torch.equal(trained[k], v) for k, v in model.state_dict().items())
    assert not any(rows_of(tmp_path / "run")[0][k] for k in train.CSV_COLUMNS if k.startswith("rollout"))


def test_a_file_of_problems_alone_trains_fully_on_policy(setup, tmp_path):
    args = run_args(setup, tmp_path / "run", "--on_policy", "1", "--epochs", "1")
    args[args.index("--data_path") + 1] = str(setup[0] / "problems.json")
    train.main(args)
    rows = rows_of(tmp_path / "run")
    assert len(rows) > 2 and all(math.isnan(float(r["val_loss"])) for r in rows)  # no teacher text to score
    assert all(float(r["train_ce"]) == 0 and float(r["rollout_kd"]) > 0 for r in rows if r["rollout_kd"])
    before = qwen3.load_model("tiny", seed=42).state_dict()
    after = qwen3.read_checkpoint(tmp_path / "run")["model"]
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it learned something


@pytest.mark.parametrize("extra, match", [
    (["--on_policy", "1", "--teacher_logits", "x.pt"], "needs an online --teacher"),
    (["--on_policy", "0.5", "--fsdp"], "not supported: generating token by token"),
    (["--on_policy", "1.5"], "in \\[0, 1\\]"),
])
def test_what_on_policy_cannot_do_is_refused_before_any_work(setup, tmp_path, extra, match):
    args = run_args(setup, tmp_path / "run", *extra)
    if "--teacher_logits" in extra:
        i = args.index("--teacher")
        del args[i:i + 2]
    with pytest.raises(ValueError, match=match):
        train.main(args)
    assert not (tmp_path / "run").exists()
