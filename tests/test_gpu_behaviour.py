"""What a GPU does differently from a CPU, reproduced on the CPU: a kernel's output layout, waits for the
device (host syncs), copies from pageable memory, dtypes, kernel launches, two processes at once. Each test
here failed on the code before its fix (the GPU first-run issue)."""
import collections
import contextlib
import copy
import io
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import data
import evaluate
import qwen3
import teacher
import train
from conftest import varied_model

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# -----------------------------------------------------------------------------
# Attention: on a GPU a masked call (every KV-cache step) runs the memory-efficient kernel


@pytest.fixture
def efficient_attention_layout(monkeypatch):
    """SDPA returning its result in the layout of CUDA's memory-efficient kernel (flash attention takes no
    mask, so every masked call lands there in float32): a [B, H, M, K] view of a [B, M, H, K] buffer, as
    PyTorch registers the kernel's output (torch/_meta_registrations.py,
    meta__scaled_dot_product_efficient_attention: res = torch.empty(B, M, num_heads, Kv), returned as
    res.transpose(1, 2)). The values are SDPA's own: only the strides differ, and those are what a .view of
    the result cannot take."""
    real = F.scaled_dot_product_attention

    def sdpa(*args, **kwargs):
        y = real(*args, **kwargs)
        B, H, M, K = y.shape
        return torch.empty(B, M, H, K, dtype=y.dtype).transpose(1, 2).copy_(y)
    monkeypatch.setattr(qwen3.F, "scaled_dot_product_attention", sdpa)


def full_forward_greedy(model, prompt, n):
    """Greedy decoding the slow way: the whole sequence through the model, no cache."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_kv_cache_generation_takes_the_memory_efficient_kernels_layout(efficient_attention_layout):
    model = varied_model(3)
    prompts = [[1, 2, 3], list(range(5, 25)), [7] * 9]
    expected = [full_forward_greedy(model, p, 10) for p in prompts]
    assert qwen3.generate(model, prompts, 10, batch_size=2) == expected
    assert [qwen3.generate_simple(model, p, 10) for p in prompts] == expected


def test_evaluation_runs_in_the_memory_efficient_kernels_layout(efficient_attention_layout, tmp_path):
    path = qwen3.save_checkpoint(tmp_path / "c.pth", varied_model(4), qwen3.load_tokenizer("tiny", "base"))
    _, test = data.synth_dataset(0, 3, seed=3)
    (tmp_path / "test.json").write_text(json.dumps(test))
    summary = evaluate.main(["generate", "--checkpoint_path", str(path), "--data_path",
                             str(tmp_path / "test.json"), "--max_new_tokens", "8",
                             "--out", str(tmp_path / "o.jsonl")])
    assert summary["num_examples"] == 3 and summary["avg_response_tokens"] == 8


# -----------------------------------------------------------------------------
# On-policy rollouts: in the step's compute dtype, not in the float32 master weights'


def test_rollouts_answer_in_the_compute_dtype_from_a_copy_refreshed_each_step(monkeypatch):
    student, tok = varied_model(5), qwen3.load_tokenizer("tiny", "base")
    batch = [{"token_ids": torch.tensor([5, 6, 7, 8, 9, 10], dtype=torch.int32), "prompt_len": 4, "row": r}
             for r in range(3)]
    caches = []

    class RecordingCache(qwen3.KVCache):
        def __init__(self, cfg, batch_size, max_len, device, dtype):
            caches.append(dtype)
            super().__init__(cfg, batch_size, max_len, device, dtype)
    monkeypatch.setattr(qwen3, "KVCache", RecordingCache)

    def answers(dtype):
        rollouts = teacher.Rollouts(student, tok, dtype, share=1.0, max_new_tokens=8, seed=3)
        caches.clear()
        written = rollouts.answer(student, [(batch, 1.0, False)], 1)[0]
        assert set(caches) == {dtype}  # the KV cache is in the compute dtype
        mine = [e["token_ids"][e["prompt_len"]:].tolist() for b, _, own in written if own for e in b]
        return mine, rollouts

    def expected(model):  # the student's answers, generated from the model given
        keys = [(1, e["row"], 0) for e in batch]
        return qwen3.generate(model, [[5, 6, 7, 8]] * 3, 8, tok.eos_token_id,
                              sampling=qwen3.Sampling(temperature=1.0, seed=3), keys=keys)

    assert answers(torch.float32)[0] == expected(student)  # --dtype float32: float32 rollouts
    bf16, rollouts = answers(torch.bfloat16)  # --dtype bfloat16: float32 weights, bfloat16 compute
    assert bf16 == expected(copy.deepcopy(student).to(torch.bfloat16))
    with torch.no_grad():  # an optimizer step later: the copy follows the student
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    caches.clear()
    after = rollouts.answer(student, [(batch, 1.0, False)], 1)[0]
    assert [e["token_ids"][4:].tolist() for b, _, mine in after if mine for e in b] == \
        expected(copy.deepcopy(student).to(torch.bfloat16)) != bf16


def test_compiled_blocks_do_not_recompile_for_rollouts(tmp_path, monkeypatch):
    """--compile with --on_policy: token by token, compiled blocks recompiled for every layer and cache layout
    until torch.compile's limit (8). The rollouts answer from an uncompiled copy."""
    rows, _ = data.synth_dataset(24, 0, seed=4)
    (tmp_path / "t.json").write_text(json.dumps(rows))
    teacher = qwen3.save_checkpoint(tmp_path / "teacher.pth", varied_model(6), qwen3.load_tokenizer("tiny"))
    import torch._dynamo
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 100)
    with contextlib.redirect_stderr(io.StringIO()):
        train.main(["--model", "tiny", "--which_model", "base", "--data_path", str(tmp_path / "t.json"),
                    "--out_dir", str(tmp_path / "run"), "--validation_size", "4", "--epochs", "1",
                    "--batch_size", "4", "--teacher", str(teacher), "--on_policy", "0.5",
                    "--rollout_max_new_tokens", "8", "--compile", "--dtype", "float32",
                    "--cache_dir", str(tmp_path / "cache")])
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 0 < graphs <= 4, graphs  # the training and validation graphs only


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A small teacher file and a teacher checkpoint: train.py runs of a few steps."""
    d = tmp_path_factory.mktemp("small")
    rows, _ = data.synth_dataset(20, 0, seed=4)
    (d / "t.json").write_text(json.dumps(rows))
    teacher = qwen3.save_checkpoint(d / "teacher.pth", varied_model(6), qwen3.load_tokenizer("tiny", "base"))
    argv = lambda out, *extra: ["--model", "tiny", "--which_model", "base", "--data_path", str(d / "t.json"),
                                "--out_dir", str(out), "--validation_size", "4", "--epochs", "1",
                                "--batch_size", "4", "--cache_dir", str(d / "cache"), *extra]
    return argv, teacher


@pytest.mark.parametrize("mode, cache_dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                               ("pure-bfloat16", torch.bfloat16)])
def test_on_policy_training_rolls_out_in_the_compute_dtype(small_run, tmp_path, monkeypatch, mode,
                                                          cache_dtype):
    argv, teacher = small_run
    caches = []
    real = qwen3.KVCache.__init__
    monkeypatch.setattr(qwen3.KVCache, "__init__", lambda self, cfg, b, n, device, dtype:
                        caches.append(dtype) or real(self, cfg, b, n, device, dtype))
    train.main(argv(tmp_path / "run", "--dtype", mode, "--teacher", str(teacher), "--on_policy", "1",
                    "--rollout_max_new_tokens", "6"))
    assert caches and set(caches) == {cache_dtype}


# -----------------------------------------------------------------------------
# Downloads: every torchrun process asks for the same files at once


def test_two_processes_downloading_one_file_into_one_cache(file_server, tmp_path):
    body = bytes(range(256)) * 8192  # 2 MiB, sent slowly: the two downloads overlap
    file_server.files["/model.safetensors"] = body
    file_server.slow_s = 0.01
    dest = tmp_path / "cache" / "model.safetensors"
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import qwen3; "
            f"qwen3.download({file_server.url + '/model.safetensors'!r}, {str(dest)!r}); print('done')")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert dest.read_bytes() == body
    assert sorted(os.listdir(dest.parent)) == ["model.safetensors"]  # no part files left
    assert [path for path, _ in file_server.requests] == ["/model.safetensors"]  # fetched once
    assert sum("waiting for another process" in out for out in outputs) == 1


# -----------------------------------------------------------------------------
# Precision: what train.py prints is what it computes in, for every combination that runs


PRECISION_PROBE = """
import contextlib, io, json, re, sys
sys.path.insert(0, {root!r})
import common, qwen3, train
seen = {{}}
forward, adamw = qwen3.MLP.forward, train.adamw
def probe(self, x):
    y = forward(self, x)
    seen["matmuls"] = str(y.dtype).replace("torch.", "")
    return y
def optimizer(parameters, *args, **kwargs):
    parameters = list(parameters)
    seen["weights"] = sorted({{str(p.dtype).replace("torch.", "") for p in parameters}})
    return adamw(parameters, *args, **kwargs)
qwen3.MLP.forward, train.adamw = probe, optimizer
for mode, fsdp in {combinations!r}:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train.main({argv!r} + ["--out_dir", f"{{sys.argv[1]}}/{{mode}}-{{fsdp}}", "--dtype", mode]
                   + (["--fsdp"] if fsdp else []))
    printed = re.search(r"precision \\S+ \\((\\w+) weights, (\\w+) matmuls\\)", out.getvalue())
    if common.init_processes("cpu", group=False)[0] == 0:
        print(json.dumps([mode, fsdp, printed and printed.groups(), seen["weights"], seen["matmuls"]]))
common.end_processes()
"""
COMBINATIONS = [(mode, fsdp) for mode in train.PRECISIONS for fsdp in (False, True)
                if (mode, fsdp) != ("bfloat16-sr", True)]  # refused in one line (tested in test_train)


@pytest.mark.parametrize("processes", [1, 2])
def test_the_printed_precision_is_the_one_used(small_run, tmp_path, processes):
    argv, _ = small_run
    script = tmp_path / "probe.py"
    script.write_text(PRECISION_PROBE.format(root=str(ROOT), combinations=COMBINATIONS,
                                             argv=argv(tmp_path)[:-2] + ["--cache_dir", str(tmp_path / "c")]))
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"][:5 * (processes == 2)]
    proc = subprocess.run([sys.executable, *launcher, str(script), str(tmp_path)], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")]
    assert [(mode, fsdp) for mode, fsdp, *_ in results] == COMBINATIONS
    for mode, fsdp, printed, weights, matmuls in results:
        assert printed == [weights[0], matmuls] and len(weights) == 1, (mode, fsdp, printed, weights, matmuls)
        assert matmuls == ("float32" if mode == "float32" else "bfloat16")  # every mode computes as it says


# -----------------------------------------------------------------------------
# Waiting for the device: a CPU never waits, so count what would wait on a GPU (reading a tensor's values on
# the host) and what would copy from pageable memory (a host list made into a device tensor in one call)


@pytest.fixture
def host_waits(monkeypatch):
    counts = collections.Counter()
    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "numpy"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k:
                            counts.update(["waits"]) or _real(self, *a, **k))
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: counts.update(["pageable"] * ("device" in k)) or
                        real_tensor(*a, **k))
    return counts


def test_a_decode_step_waits_for_the_device_once(host_waits, monkeypatch):
    model = varied_model(7)
    real_forward = qwen3.Qwen3.forward
    monkeypatch.setattr(qwen3.Qwen3, "forward", lambda self, ids, cache=None, **k: host_waits.update(
        ["steps"] * (ids.shape[1] == 1)) or real_forward(self, ids, cache, **k))
    prompts = [[1, 2, 3], list(range(5, 25)), [7] * 9, [4, 4]]
    budget = qwen3.ThinkingBudget(tokens=5, open_id=1, close_ids=[2, 3], answer_tokens=3)
    for sampling in (qwen3.Sampling(), qwen3.Sampling(temperature=0.8, top_p=0.9, top_k=20, seed=1)):
        host_waits.clear()
        answers = qwen3.generate(model, prompts, 12, batch_size=3, sampling=sampling, budget=budget)
        assert sum(map(len, answers)) > 12 and host_waits["steps"] >= 12
        assert host_waits["waits"] <= host_waits["steps"], host_waits  # the new tokens, once a step
        assert host_waits["pageable"] == 0, host_waits


def test_to_device_goes_through_pinned_memory_without_waiting(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pinned") or self)
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append((a, k)) or real_to(self))
    qwen3.to_device([1, 2], "cuda")
    assert calls == ["pinned", (("cuda",), {"non_blocking": True})]


def test_a_training_step_never_waits_for_the_device():
    """train.py's step (micro-batches, chunked loss, backward, the teacher's targets) on the meta device:
    every tensor must be where the model is (a host tensor meeting a meta one raises), and nothing may read
    values on the host (a meta tensor has none to read: .item(), .tolist() and boolean masks raise)."""
    tok = qwen3.load_tokenizer("tiny", "base")
    examples, _ = data.build_examples(data.synth_dataset(6, 0, seed=1)[0], tok, False)
    student = qwen3.load_model("tiny", device="meta").train()
    for soft in (None, teacher.Teacher("tiny", tok, 320, teacher.KD("reverse_kl"), "meta")):
        args = Namespace(per_example_mean=False, kd_weight=0.5)
        steps = [examples[:2], examples[2:5]]
        ce, kd, tokens, _ = train.forward_backward(student, steps, args, "meta", soft=soft)
        assert ce.device.type == kd.device.type == "meta" and tokens == sum(len(e["token_ids"]) - 1
                                                                             for e in examples[:5])
        assert all(p.grad is not None and p.grad.device.type == "meta" for p in student.parameters())
        student.zero_grad(set_to_none=True)


def test_a_stochastic_rounding_step_is_a_few_kernels_per_bucket():
    """The profiler's top-level operations in one optimizer step, on the CPU, as the proxy for kernel
    launches: with a GPU's bucket all of the tiny model is one bucket, where one kernel per operation per
    tensor made about 23 x 42."""
    model = qwen3.load_model("tiny", dtype=torch.bfloat16)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer = train.adamw(model.parameters(), "cpu", 1e-3, 0.01, "bfloat16-sr")
    optimizer.step()  # the state is created
    optimizer.bucket = 1 << 24  # a GPU's
    views = {"aten::view", "aten::split", "aten::split_with_sizes", "aten::empty_like", "aten::slice"}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        optimizer.step()
    launched = [e.name for e in profile.events() if e.name.startswith("aten::") and e.name not in views
                and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))]
    assert 15 <= len(launched) <= 40, collections.Counter(launched)


# -----------------------------------------------------------------------------
# .ci/gpu: a crash must read as a failure


def test_gpu_checks_report_failures_as_failures(tmp_path):
    script = f"""source .ci/gpu
out={tmp_path}/gpu.jsonl tmp={tmp_path} begin=$SECONDS budget=60 per_check=2
check fine python3 -c 'print(1)'
check crashed python3 -c 'import json, sys; print(json.dumps({{"looks": 1}})); sys.exit("boom: it broke")'
check hung sleep 10
budget=-1
check late true
"""
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "gpu.jsonl").read_text().splitlines()
    fine, crashed, hung, late = map(json.loads, lines)
    assert fine["ok"] and fine["result"] == 1 and "error" not in fine
    assert not crashed["ok"] and crashed["error"].startswith("exit status 1: ") and "boom: it broke" in \
        crashed["error"] and crashed["result"] == {"looks": 1}  # the last output is kept, but not as ok
    assert not hung["ok"] and hung["error"].startswith("exit status 124 (timed out)")
    assert not late["ok"] and late["skipped"]
