"""train.py and evaluate.py under torchrun: 2 CPU processes with the gloo backend, each on one thread, each
launch under a timeout so that a hang fails the test instead of blocking the suite."""
import csv
import json
import os
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
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*argv, wait=True):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *argv]
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    if wait:
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, output
    return proc


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    rows, test = data.synth_dataset(80, 9, seed=1)
    (d / "train.json").write_text(json.dumps(rows))
    (d / "test.json").write_text(json.dumps(test))
    return d


def run_args(synth, out_dir, *extra):
    # 74 training examples in batches of 2: 37 micro-batches, so the last step of an epoch has one micro-batch
    # for two processes
    return ["--model", "tiny", "--which_model", "base", "--data_path", str(synth / "train.json"), "--out_dir",
            str(out_dir), "--validation_size", "6", "--epochs", "2", "--log_every", "4", "--lr", "3e-3",
            "--batch_size", "2", "--dtype", "float32", "--cache_dir", str(synth / "cache"), *extra]


def losses(run_dir):
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return [
            (float(r["total_steps"]), float(r["train_loss"]), float(r["val_loss"])) for r in csv.DictReader(f)
        ]


def assert_same_run(a, b):
    assert [v for row in losses(a) for v in row] == pytest.approx(
        [v for row in losses(b) for v in row], rel=1e-5
    )
    wa, wb = qwen3.read_checkpoint(a)["model"], qwen3.read_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def one_process(synth):
    """The reference: one process taking the same 4 examples per optimizer step (2 micro-batches of 2)."""
    train.main(run_args(synth, synth / "one", "--grad_accum", "2"))
    return synth / "one"


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_exactly_as_one(synth, one_process, mode):
    out = synth / mode
    torchrun("train.py", *run_args(synth, out, *(["--fsdp"] if mode == "fsdp" else [])))
    assert_same_run(out, one_process)
    assert sorted(p.name for p in out.glob("*.pth")) == sorted(p.name for p in one_process.glob("*.pth"))
    assert len(losses(out)) == len(losses(one_process))  # one process wrote the CSV, once


def test_soft_distillation_over_two_processes_equals_one(synth):
    kd = ["--teacher", "tiny", "--kd_weight", "0.5", "--kd_loss", "reverse_kl", "--epochs", "1"]
    train.main(run_args(synth, synth / "kd-one", "--grad_accum", "2", *kd))
    torchrun("train.py", *run_args(synth, synth / "kd-two", *kd))
    assert_same_run(synth / "kd-two", synth / "kd-one")


def test_on_policy_over_two_processes_equals_one(synth):
    """Each process rolls out its own share of the step's prompts: the same answers, losses and log."""
    on_policy = ["--teacher", "tiny", "--on_policy", "0.5", "--kd_loss", "reverse_kl",
                 "--rollout_max_new_tokens", "8", "--epochs", "1"]
    train.main(run_args(synth, synth / "op-one", "--grad_accum", "2", *on_policy))
    torchrun("train.py", *run_args(synth, synth / "op-two", *on_policy))
    flat = [[v for row in losses(synth / name) for v in row] for name in ("op-two", "op-one")]
    assert flat[0] == pytest.approx(flat[1], rel=1e-5)
    # gradients summed in another order: AdamW turns a last-bit difference in a tiny gradient into ~1e-6
    wa, wb = (qwen3.read_checkpoint(synth / name)["model"] for name in ("op-two", "op-one"))
    assert all(torch.allclose(wa[name], wb[name], atol=2e-5, rtol=1e-4) for name in wa)

    def rollout_log(name):
        with open(synth / name / "metrics.csv", newline="") as f:
            return [float(r[f"rollout_{k}"]) for r in csv.DictReader(f)
                    for k in ("len", "cut", "boxed", "kd")]
    assert rollout_log("op-two") == pytest.approx(rollout_log("op-one"), rel=1e-5, abs=1e-5)  # 6 digits
    assert all(length > 0 for length in rollout_log("op-one")[::4])  # answers were written


def test_bfloat16_sr_over_two_processes_trains_as_one_and_keeps_the_replicas_equal(synth, tmp_path):
    sr = ["--dtype", "bfloat16-sr", "--epochs", "1"]
    train.main(run_args(synth, synth / "sr-one", "--grad_accum", "2", *sr))
    torchrun("train.py", *run_args(synth, synth / "sr-two", *sr))
    # the same steps; bfloat16 gradients summed in another order round differently, so close, not equal
    one, two = losses(synth / "sr-one"), losses(synth / "sr-two")
    assert [row[0] for row in two] == [row[0] for row in one]
    losses_of = lambda rows: [v for row in rows for v in row[1:]]  # flat: pytest.approx takes no nesting
    assert losses_of(two) == pytest.approx(losses_of(one), rel=0.02)
    # each process rounds its own replica: with the same random stream they stay equal, bit for bit
    script = tmp_path / "replicas.py"
    script.write_text(f"""import sys; sys.path.insert(0, {str(ROOT)!r})
import torch, common, qwen3, train
rank, world_size, device = common.init_processes("cpu")
model = qwen3.load_model("tiny", dtype=torch.bfloat16, seed=0).train()
ddp = common.distribute(model, False, None, world_size)
optimizer = train.adamw(ddp.parameters(), "cpu", 1e-3, 0.01, "bfloat16-sr", seed=0)
start = [p.detach().clone() for p in model.parameters()]
for step in range(3):
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(10 * rank + step))
    ddp(ids).float().logsumexp(-1).mean().backward()  # each process its own data
    optimizer.step()
    optimizer.zero_grad()
flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
replicas = [torch.empty_like(flat) for _ in range(world_size)]
torch.distributed.all_gather(replicas, flat)
moved = sum((p != s).sum().item() for p, s in zip(model.parameters(), start)) / flat.numel()
if rank == 0:
    print("replicas equal:", torch.equal(*replicas), "moved:", round(moved, 2), flush=True)
del ddp  # then leave the group as every script does (common.run)
common.end_processes()

""")
    proc = torchrun(str(script), wait=False)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    (line,) = [line for line in output.splitlines() if line.startswith("replicas equal")]
    assert line.startswith("replicas equal: True moved: "), output
    assert float(line.split()[-1]) > 0.5, output  # the steps did move the weights


def test_every_micro_batch_goes_to_exactly_one_process():
    batches = [[{"token_ids": [0] * n}] for n in range(3, 8)]
    shares = [train.rank_share(batches, rank, 2) for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 3  # as many forwards on each: the collectives match
    real = [id(b) for share in shares for b, weight in share if weight]
    assert sorted(real) == sorted(map(id, batches))  # none dropped, none twice
    assert [w for _, w in shares[1]] == [1.0, 1.0, 0.0]  # the stand-in only takes part


def children(pid):
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_ctrl_c_to_one_process_leaves_a_run_that_resumes(synth, one_process, mode):
    out, fsdp = synth / f"stopped-{mode}", ["--fsdp"] if mode == "fsdp" else []
    proc = torchrun("train.py", *run_args(synth, out, *fsdp), wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.csv").exists() and
                                          len((out / "metrics.csv").read_text().splitlines()) >= 3):
        time.sleep(0.05)
    workers = children(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGINT)  # the second process only
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "interrupted: saved" in output, output
    assert (out / "last.pth").exists() and len(losses(out)) < len(losses(one_process))
    if mode == "fsdp":  # the same number of processes
        torchrun("train.py", "--resume", str(out))
    else:  # or one process instead of two: two micro-batches per step keep every step's examples
        train.main(["--resume", str(out)])
    assert [row[0] for row in losses(out)] == [row[0] for row in losses(one_process)]
    assert_same_run(out, one_process)


def test_evaluation_over_two_processes_writes_what_one_writes(synth, tmp_path):
    model, tok = qwen3.load_model("tiny", seed=11), qwen3.load_tokenizer("tiny", "base")
    checkpoint = qwen3.save_checkpoint(tmp_path / "c.pth", model, tok)
    flags = [
        "--checkpoint_path",
        str(checkpoint),
        "--data_path",
        str(synth / "test.json"),
        "--max_new_tokens",
        "10",
        "--temperature",
        "1.0",
        "--num_samples",
        "2",
        "--batch_size",
        "3",
    ]
    import evaluate
    evaluate.main(["generate", *flags, "--out", str(tmp_path / "one.jsonl")])
    torchrun("evaluate.py", "generate", *flags, "--out", str(tmp_path / "two.jsonl"))
    def untimed(name):  # the time each answer took is the one field that differs
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (tmp_path / name).read_text().splitlines()]
    assert untimed("two.jsonl") == untimed("one.jsonl")
    timing = {"wall_time_s", "tokens_per_sec"}
    one, two = (json.loads((tmp_path / f"{n}.summary.json").read_text()) for n in ("one", "two"))
    assert {k: v for k, v in one.items() if k not in timing} == {
        k: v for k, v in two.items() if k not in timing
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "c.pth",
        "one.jsonl",
        "one.summary.json",
        "two.jsonl",
        "two.summary.json",
    ]  # no part files left
