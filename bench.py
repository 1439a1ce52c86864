"""
Benchmarks: training speed, MFU and memory; time to a target loss; memory estimates; generation; data.

    python bench.py train --model tiny --batch_size 16 --seq_len 256 --compare
    python bench.py train --model random-0.6B --device cuda --batch_size 8 --seq_len 2048 --compare
    python bench.py memory --model random-4B --processes 8
    python bench.py converge --target_loss 0.3 -- --model tiny --which_model base --data_path demo/train.json
    python bench.py generate --model tiny --batch_size 16 --compare
    python bench.py data --tokenizer ../shared/qwen3-tokenizer/tokenizer.json
Under torchrun, `train` also reports the total over processes and the scaling efficiency.
--json prints every figure as one JSON object on the last line.
"""
import argparse
import dataclasses
import json
import random
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import common
import data
import qwen3
import teacher
import train

# dense bfloat16 peaks, for MFU
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}

# -----------------------------------------------------------------------------
# Helpers


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak_memory(device):
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    elif Path("/proc/self/clear_refs").exists():  # Linux: restart the peak resident memory from now
        Path("/proc/self/clear_refs").write_text("5")


def detect_peak_tflops(device):
    if str(device).startswith("cuda"):
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def autocast_for(precision, device):
    _, _, autocast_dtype = precision
    return torch.autocast(device.split(":")[0], autocast_dtype) if autocast_dtype else None


def synthetic_examples(n, seq_len, vocab_size, seed):
    """Examples of 50-100% of seq_len tokens, the first quarter prompt: lengths vary as in real data."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        length = rng.randint(seq_len // 2, seq_len)
        examples.append({"token_ids": [rng.randrange(vocab_size) for _ in range(length)],
                         "prompt_len": length // 4, "row": 0})
    return examples


def time_steps(parameters, steps, device, step_fn, warmup, precision="float32"):
    """Seconds for the timed steps (after warm-up), the tokens step_fn reports, and the seconds of those
    spent in the optimizer: train.py's AdamW for the precision, at lr 1e-5."""
    optimizer = train.adamw(parameters, device, lr=1e-5, weight_decay=0.0, precision=precision)
    tokens, start, optimizer_s = 0, None, 0.0
    for i, step in enumerate(steps):
        if i == warmup:
            sync(device)
            start, tokens, optimizer_s = time.time(), 0, 0.0
        tokens += step_fn(step)
        sync(device)
        optimizer_start = time.time()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        optimizer_s += time.time() - optimizer_start
    sync(device)
    return time.time() - start, tokens, optimizer_s


# -----------------------------------------------------------------------------
# Training speed, MFU and memory


def bench_train(args, model, device, rank, world_size):
    """train.py's own step (collate, chunked answer loss, backward) on synthetic batches."""
    precision = train.pick_precision(args.precision, device, args.fsdp)
    autocast = autocast_for(precision, device)
    step_args = argparse.Namespace(per_example_mean=False, kd_weight=0.5)
    n = args.batch_size * (args.steps + args.warmup)
    examples = synthetic_examples(n, args.seq_len, model.cfg.vocab_size, args.seed + rank)
    batches = [[b] for b in data.make_batches(examples, args.batch_size, args.seed)]
    model.train()
    model.grad_checkpointing = args.grad_checkpointing

    def measure(trained, soft=None):
        def step(micro_batches):
            return train.forward_backward(trained, micro_batches, step_args, device, autocast=autocast,
                                          soft=soft)[2]
        reset_peak_memory(device)
        seconds, tokens, optimizer_s = time_steps(model.parameters(), batches, device, step, args.warmup,
                                                  precision[0])
        return tokens / seconds, common.peak_memory_gib(device), optimizer_s / args.steps

    # the copies live on the host: on the device they would count in the peak memory measured next
    before = [p.detach().to("cpu", copy=True) for p in model.parameters()] if args.count_changes else []
    tokens_per_sec, memory, optimizer_s = measure(model)
    flops = model.flops_per_token(args.seq_len * 3 // 4)  # the average length of the synthetic examples
    result = {"mode": "train", "precision": precision[0], "tokens_per_sec": tokens_per_sec,
              "tflops": flops * tokens_per_sec / 1e12, "peak_memory_gib": memory,
              "optimizer_step_s": optimizer_s}
    if before:  # AdamW at lr 1e-5: how many weights did its steps move at all?
        changed = sum((p.cpu() != b).sum().item() for p, b in zip(model.parameters(), before))
        result["changed_fraction"] = changed / model.num_params()
    if world_size > 1:  # the same steps again, gradients synchronised: what data parallelism costs
        trained = common.distribute(model, args.fsdp, precision[2], world_size)
        per_process, memory, _ = measure(trained)
        result.update(tokens_per_sec=per_process, single_process_tokens_per_sec=tokens_per_sec,
                      tokens_per_sec_total=common.all_sum([per_process], device)[0], processes=world_size,
                      scaling_efficiency=per_process / tokens_per_sec, tflops=flops * per_process / 1e12,
                      peak_memory_gib=memory)
    if args.teacher:
        soft = teacher.Teacher(args.teacher, qwen3.load_tokenizer(args.model), model.cfg.vocab_size,
                               teacher.KD(), device, timed=bool(args.on_policy_tokens))
        kd_tokens_per_sec, kd_memory, _ = measure(model, soft)
        result.update(kd_tokens_per_sec=kd_tokens_per_sec, kd_time_ratio=tokens_per_sec / kd_tokens_per_sec,
                      kd_peak_memory_gib=kd_memory, kd_extra_memory_gib=kd_memory - memory)
        if args.on_policy_tokens:
            result.update(bench_on_policy_step(args, model, soft, examples, device, precision))
    if args.compare:  # the reference's loop: one example per step, full logits (train.plain_answer_loss)
        def reference_step(micro_batches):
            (example,) = micro_batches[0]
            with autocast or nullcontext():
                loss = train.plain_answer_loss(model, [example], [1.0 / train.answer_len(example)], device)
            loss.backward()
            return len(example["token_ids"]) - 1
        singles = [[[e]] for e in examples[:args.batch_size * 4 + args.warmup]]
        seconds, tokens, _ = time_steps(model.parameters(), singles, device, reference_step, args.warmup,
                                        precision[0])
        result.update(baseline_tokens_per_sec=tokens / seconds, speedup=tokens_per_sec * seconds / tokens)
    return result


def bench_on_policy_step(args, model, soft, examples, device, precision):
    """One on-policy step (train.forward_backward with teacher.Rollouts) in its three parts: the student's
    rollout of --on_policy_tokens tokens per prompt (a random model rarely stops early: the cap is what is
    timed), the teacher's scoring, the student's forward and backward. The second of two steps is timed."""
    step_args = argparse.Namespace(per_example_mean=False, kd_weight=0.5)
    autocast = autocast_for(precision, device)
    tok = qwen3.load_tokenizer(args.model)
    rollouts = teacher.Rollouts(model, tok, precision[2] or precision[1], share=1.0,
                                max_new_tokens=args.on_policy_tokens, seed=args.seed)
    batch = [{**e, "token_ids": torch.as_tensor(e["token_ids"]), "row": i}
             for i, e in enumerate(examples[:args.batch_size])]
    reset_peak_memory(device)
    for _ in range(2):
        sync(device)
        start = time.time()
        stats = train.forward_backward(model, [batch], step_args, device, autocast=autocast, soft=soft,
                                       rollouts=rollouts)[3]
        sync(device)
        seconds = time.time() - start
        model.zero_grad(set_to_none=True)
    return {"on_policy_step_s": seconds, "on_policy_rollout_s": stats["rollout_s"],
            "on_policy_teacher_s": stats["teacher_s"],
            "on_policy_update_s": seconds - stats["rollout_s"] - stats["teacher_s"],
            "on_policy_answer_tokens": stats["tokens"],
            "on_policy_peak_memory_gib": common.peak_memory_gib(device)}


def report_train(args, result):
    scaling = ""
    if "processes" in result:
        scaling = (f" per process, {result['tokens_per_sec_total']:,.0f} in all over {result['processes']} "
                   f"(scaling efficiency {100 * result['scaling_efficiency']:.0f}%)")
    mfu = f", MFU {100 * result['mfu']:.1f}%" if "mfu" in result else ""
    changed = (f"; AdamW moved {100 * result['changed_fraction']:.1f}% of the weights"
               if "changed_fraction" in result else "")
    print(f"train on {result['device']} ({result['precision']}), batch {args.batch_size}: "
          f"{result['tokens_per_sec']:,.0f} tokens/s{scaling}, {result['tflops']:.2f} TFLOP/s{mfu}, "
          f"peak memory {result['peak_memory_gib']:.2f} GiB, AdamW step {result['optimizer_step_s']:.3f} s"
          f"{changed}")
    if "speedup" in result:
        print(f"baseline (per-example, full logits): {result['baseline_tokens_per_sec']:,.0f} tokens/s -> "
              f"speedup {result['speedup']:.1f}x")
    if "kd_time_ratio" in result:
        print(f"soft distillation from {args.teacher}: {result['kd_tokens_per_sec']:,.0f} tokens/s "
              f"({result['kd_time_ratio']:.2f}x the time per step), peak memory "
              f"{result['kd_peak_memory_gib']:.2f} GiB ({result['kd_extra_memory_gib']:+.2f})")
    if "on_policy_step_s" in result:
        r = result
        print(f"one on-policy step, {args.batch_size} prompts x {args.on_policy_tokens} tokens: "
              f"{r['on_policy_step_s']:.2f} s = rollout {r['on_policy_rollout_s']:.2f} + teacher "
              f"{r['on_policy_teacher_s']:.2f} + student forward and backward {r['on_policy_update_s']:.2f}; "
              f"peak memory {r['on_policy_peak_memory_gib']:.2f} GiB")


# -----------------------------------------------------------------------------
# Time to a target validation loss


def bench_converge(args, train_argv):
    """Train as train.py would until the validation loss reaches --target_loss: the wall time of the training
    steps (validation excluded), checked every --eval_every examples, so batch sizes compare at equal data."""
    targs = train.parse_args(train_argv)
    device = qwen3.pick_device(targs.device)
    precision = train.pick_precision(targs.precision, device)
    autocast = autocast_for(precision, device)
    model = qwen3.load_model(targs.model, device, precision[1], targs.cache_dir, targs.seed)
    tok = qwen3.load_tokenizer(targs.model, targs.which_model, targs.cache_dir)
    train_examples, val = train.load_examples(targs, tok, say=lambda *a: None)
    optimizer = train.adamw(model.parameters(), device, targs.lr, targs.weight_decay, precision[0],
                            targs.seed)
    total_steps = len(train.optimizer_steps(train_examples, targs, 1, 1)) * targs.epochs
    all_steps = (step for epoch in range(1, targs.epochs + 1)
                 for step in train.optimizer_steps(train_examples, targs, epoch, 1))
    seconds, steps, examples, tokens, curve, next_check = 0.0, 0, 0, 0, [], args.eval_every
    model.train()
    for micro_batches in all_steps:  # train.py's steps 1-5, timed
        start = time.time()
        for group in optimizer.param_groups:
            group["lr"] = train.learning_rate(steps, total_steps, targs)
        tokens += train.forward_backward(model, micro_batches, targs, device, autocast=autocast)[2]
        if targs.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), targs.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        seconds, steps = seconds + time.time() - start, steps + 1
        examples += sum(map(len, micro_batches))
        if examples >= next_check or steps == total_steps:
            next_check += args.eval_every
            val_loss = train.validation_loss(model, val, targs, device, autocast=autocast)
            curve.append((round(seconds, 2), examples, val_loss))
            if val_loss <= args.target_loss:
                break
    return {"mode": "converge", "precision": precision[0], "target_loss": args.target_loss,
            "reached": curve[-1][2] <= args.target_loss, "seconds": seconds, "steps": steps,
            "examples": examples, "val_loss": curve[-1][2], "tokens_per_sec": tokens / seconds,
            "batch_size": targs.batch_size,
            "lr": targs.lr, "curve": curve}


# -----------------------------------------------------------------------------
# Memory estimates


def bench_memory(args):
    """Training memory per GPU for a model shape, estimated on the CPU: weights, gradients and AdamW state by
    precision mode (bytes per parameter), the activations autograd keeps for backward (measured on a one- and
    a two-block model at 256 tokens, scaled to the blocks and tokens asked for) and the loss's working memory
    (the largest chunk of logits; with bfloat16 weights also the head's gradient, summed in float32). With
    --processes N, FSDP's shards: the state divided by N, plus the blocks gathered at a time."""
    cfg = qwen3.RANDOM_CONFIGS[args.model]
    params = qwen3.empty_model(cfg, "meta", torch.float32).num_params()
    one_block = qwen3.empty_model(dataclasses.replace(cfg, num_hidden_layers=1), "meta", torch.float32)
    block = sum(p.numel() for p in one_block.layers.parameters())
    result = {"mode": "memory", "model": args.model, "params": params,
              "tokens": args.batch_size * args.seq_len}
    for mode, (weights_dtype, autocast_dtype) in train.PRECISIONS.items():
        try:
            train.pick_precision(mode, "cpu", fsdp=args.processes > 1)
        except ValueError:
            continue  # a mode FSDP cannot run (train.pick_precision says why)
        weight_bytes = torch.finfo(weights_dtype).bits // 8
        state = params * weight_bytes * 4  # weights, gradients, AdamW's two moments: in the weights' dtype
        if args.processes > 1:  # FSDP: a 1/N shard of it, and two blocks gathered at a time (one prefetched),
            # in bfloat16 under mixed precision, which FSDP computes in without autocast's copies
            state = state / args.processes + 2 * block * (2 if autocast_dtype else weight_bytes)
            weights_dtype = torch.bfloat16 if autocast_dtype else weights_dtype
            autocast_dtype = None
        copies, per_block, fixed = _saved_tensors(cfg, weights_dtype, autocast_dtype)
        activations = (fixed + per_block * cfg.num_hidden_layers) * result["tokens"] / 256
        chunk = 512 * cfg.vocab_size * (4 + 4 + 2)  # float32 logits and their gradient, its bfloat16 copy
        if weights_dtype != torch.float32:  # the head's gradient, summed over the chunks in float32
            chunk += cfg.vocab_size * cfg.hidden_size * 4
        result[mode] = {"state_gib": state / 2**30, "weight_copies_gib": copies / 2**30,
                        "activations_gib": activations / 2**30, "loss_chunk_gib": chunk / 2**30,
                        "total_gib": (state + copies + activations + chunk) / 2**30}
    return result


def _saved_tensors(cfg, weights_dtype, autocast_dtype, tokens=256):
    """Bytes autograd saves in a forward of `tokens` tokens, as (bfloat16 weight copies made by autocast,
    per block, the rest), from one- and two-block models of the config's width."""
    totals = []
    for layers in (1, 2):
        model = qwen3.empty_model(dataclasses.replace(cfg, num_hidden_layers=layers), "cpu", weights_dtype)
        own = {p.data_ptr() for p in model.parameters()}
        shapes = {tuple(p.shape) for p in model.parameters()}
        saved = {}  # storage -> (bytes, is a weight copy)

        def pack(t):
            if t.data_ptr() not in own:
                storage = t.untyped_storage()
                saved[storage.data_ptr()] = (storage.nbytes(), tuple(t.shape) in shapes)
            return t
        batch = [{"token_ids": torch.zeros(tokens + 1, dtype=torch.long), "prompt_len": 1, "row": 0}]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            train.answer_loss(model, batch, [1.0 / tokens], "cpu")
        copies = sum(n for n, copy in saved.values() if copy)
        totals.append((copies, sum(n for n, _ in saved.values()) - copies))
    (copies1, acts1), (copies2, acts2) = totals
    per_block = acts2 - acts1
    copies = copies1 + (copies2 - copies1) * (cfg.num_hidden_layers - 1)
    return copies, per_block, acts1 - per_block


def report_memory(args, result):
    fsdp = f", FSDP over {args.processes} GPUs" if args.processes > 1 else ""
    print(f"{args.model} ({result['params'] / 1e9:.2f}B parameters), {result['tokens']} tokens per "
          f"micro-batch{fsdp}: GiB per GPU")
    for mode in (m for m in train.PRECISIONS if m in result):
        r = result[mode]
        print(f"  {mode:>13}: {r['total_gib']:6.1f} = weights, gradients and AdamW {r['state_gib']:.1f} + "
              f"bfloat16 weight copies {r['weight_copies_gib']:.1f} + activations "
              f"{r['activations_gib']:.1f} + loss {r['loss_chunk_gib']:.1f}")

# -----------------------------------------------------------------------------
# Generation and data preparation


def bench_generate(args, model, device):
    rng = random.Random(args.seed)
    lengths = [rng.randint(args.seq_len // 2, args.seq_len) for _ in range(args.batch_size)]
    prompts = [[rng.randrange(model.cfg.vocab_size) for _ in range(n)] for n in lengths]
    model.eval()
    qwen3.generate(model, prompts[:2], 4)  # warm-up
    sync(device)
    reset_peak_memory(device)  # generation's own peak, not loading's (float32 weights, then cast)
    start = time.time()
    out = qwen3.generate(model, prompts, args.max_new_tokens)
    sync(device)
    seconds = time.time() - start
    tokens = sum(map(len, out))
    result = {"mode": "generate", "precision": str(model.embed_tokens.weight.dtype).replace("torch.", ""),
              "tokens_per_sec": tokens / seconds, "peak_memory_gib": common.peak_memory_gib(device)}
    if args.compare:  # the plain loop: one prompt at a time (qwen3.generate_simple)
        start = time.time()
        singles = [qwen3.generate_simple(model, p, args.max_new_tokens) for p in prompts]
        sync(device)
        baseline = sum(map(len, singles)) / (time.time() - start)
        result.update(baseline_tokens_per_sec=baseline, speedup=result["tokens_per_sec"] / baseline,
                      identical_to_sequential=singles == out)
    return result


def report_generate(args, result):
    print(f"generate on {result['device']} ({result['precision']}), batch {args.batch_size}: "
          f"{result['tokens_per_sec']:,.0f} tokens/s, peak memory {result['peak_memory_gib']:.2f} GiB")
    if "speedup" in result:
        print(f"baseline (one prompt at a time): {result['baseline_tokens_per_sec']:,.0f} tokens/s -> "
              f"speedup {result['speedup']:.1f}x, output identical: {result['identical_to_sequential']}")


def bench_data(args):
    """Tokenize a teacher file of the real size (12,000 rows, ~100 MB, from real rows), cold and cached."""
    tok = qwen3.load_tokenizer(args.tokenizer, "reasoning")
    sample = data.read_rows(args.sample_rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "teacher.json"
        rows = []
        for i in range(args.rows):
            row = dict(sample[i % len(sample)])
            row["problem"] = f"{row['problem']} (variant {i})"
            row["message_thinking"] = row["message_thinking"] * args.repeat_thinking
            rows.append(row)
        path.write_text(json.dumps(rows))
        size_mb = path.stat().st_size / 1e6
        start = time.time()
        examples, _, _ = data.prepare_examples(path, tok, use_think_tokens=True, cache_dir=tmp)
        cold = time.time() - start
        start = time.time()
        data.prepare_examples(path, tok, use_think_tokens=True, cache_dir=tmp)
        cached = time.time() - start
    tokens = sum(len(e["token_ids"]) for e in examples)
    return {"mode": "data", "rows": args.rows, "file_mb": size_mb, "tokens": tokens, "cold_s": cold,
            "cached_s": cached, "cold_tokens_per_sec": tokens / cold}


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p, sub = common.parser(__doc__, train="training throughput, MFU and memory on synthetic batches",
                           memory="training memory per GPU of a model shape in each precision mode, "
                                  "estimated on the CPU",
                           converge="time to a target validation loss, training as train.py does",
                           generate="generation throughput on synthetic prompts",
                           data="tokenizing a teacher file of the real size, cold and cached")
    for name in ("train", "generate"):
        s = sub[name]
        s.add_argument("--model", default="tiny", help="a random model of a real shape ('random-0.6B' to "
                       "'random-8B'), 'tiny', or a Hub repo id or Hugging Face-layout directory")
        s.add_argument("--device", default="auto", help="auto = cuda, then mps, then cpu")
        s.add_argument("--batch_size", type=int, default=16)
        s.add_argument("--seq_len", type=int, default=256,
                       help="longest example / prompt (lengths vary from half of it)")
        s.add_argument("--compare", action="store_true",
                       help="also time the plain baseline; print the speedup")
        s.add_argument("--seed", type=int, default=0)
    t = sub["train"]
    t.add_argument("--precision", "--dtype", default="auto", choices=["auto", *train.PRECISIONS],
                   help="training precision, as in train.py")
    t.add_argument("--steps", type=int, default=10, help="timed training steps")
    t.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    t.add_argument("--grad_checkpointing", action="store_true")
    t.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    t.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 instead of DDP")
    t.add_argument("--layers", type=int, default=0, help="train only the model's first N blocks: at the "
                   "real widths on a CPU, the memory of a block is the difference between 1 and 2")
    t.add_argument("--count_changes", action="store_true",
                   help="report the share of weights that the steps changed")
    t.add_argument("--teacher", default=None, help="also time soft distillation from this teacher (e.g. "
                   "'tiny', 'random-4B'); prints the extra time and memory")
    t.add_argument("--on_policy_tokens", type=int, default=0, help="with --teacher: also time one on-policy "
                   "step whose rollout writes this many tokens per prompt, in its three parts")
    t.add_argument("--peak_tflops", type=float, default=None,
                   help="device peak for MFU (detected for common GPUs)")
    g = sub["generate"]
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="inference dtype; auto = bfloat16 on cuda, float32 elsewhere")
    g.add_argument("--max_new_tokens", type=int, default=64, help="tokens per prompt")
    m = sub["memory"]
    m.add_argument("--model", default="random-0.6B", choices=[n for n in qwen3.RANDOM_CONFIGS if n != "tiny"])
    m.add_argument("--batch_size", type=int, default=1)
    m.add_argument("--seq_len", type=int, default=2048, help="tokens per example")
    m.add_argument("--processes", type=int, default=1, help="FSDP over this many GPUs")
    c = sub["converge"]
    c.add_argument("--target_loss", type=float, required=True,
                   help="stop when the validation loss is this low")
    c.add_argument("--eval_every", type=int, default=500, help="validate every N training examples")
    d = sub["data"]
    d.add_argument("--tokenizer", default="Qwen/Qwen3-0.6B",
                   help="tokenizer.json, model directory or repo id")
    d.add_argument("--sample_rows", default=str(Path(__file__).parent / "tests" / "data" /
                                                "teacher_sample.json"),
                   help="real teacher rows to build the 12,000-row file from")
    d.add_argument("--rows", type=int, default=12000)
    d.add_argument("--repeat_thinking", type=int, default=3,
                   help="repeat each trace to reach the real rows' ~9 kB")
    for s in sub.values():
        s.add_argument("--json", action="store_true", help="print all figures as JSON on the last line")
    args, rest = p.parse_known_args(argv)  # converge passes the rest (after --) to train.py's parser
    if rest and args.cmd != "converge":
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    return args, [r for r in rest if r != "--"]


def main(argv=None):
    args, train_argv = parse_args(argv)
    rank = 0
    if args.cmd == "data":
        result = bench_data(args)
        print(f"tokenized {result['rows']} rows ({result['file_mb']:.0f} MB, {result['tokens'] / 1e6:.1f}M "
              f"tokens): cold {result['cold_s']:.1f} s, cached {result['cached_s']:.2f} s")
    elif args.cmd == "memory":
        result = bench_memory(args)
        report_memory(args, result)
    elif args.cmd == "converge":
        result = bench_converge(args, train_argv)
        print(f"{'reached' if result['reached'] else 'did not reach'} validation loss {args.target_loss} "
              f"({result['val_loss']:.4f}) in {result['seconds']:.1f} s of training: {result['steps']} "
              f"steps, {result['examples']} examples, {result['tokens_per_sec']:,.0f} tokens/s")
    else:  # train, generate: a model on a device (one per process under torchrun)
        rank, world_size, device = common.init_processes(args.device)
        if args.cmd == "train":
            dtype = train.pick_precision(args.precision, device)[1]
        else:
            dtype = qwen3.pick_dtype(args.dtype, device)
        model = qwen3.load_model(args.model, device, dtype, seed=args.seed)
        if args.cmd == "train" and args.layers:  # the first N blocks of the shape (the rest unused)
            model.layers, model.cfg = model.layers[:args.layers], dataclasses.replace(
                model.cfg, num_hidden_layers=args.layers)
        if args.cmd == "train" and args.compile:
            model.compile_blocks()
        if args.cmd == "train":
            result = bench_train(args, model, device, rank, world_size)
        else:
            result = bench_generate(args, model, device)
        name = torch.cuda.get_device_name() if device.startswith("cuda") else device
        result.update(model=args.model, device=name, batch_size=args.batch_size, seq_len=args.seq_len,
                      torch=torch.__version__)
        peak = getattr(args, "peak_tflops", None) or detect_peak_tflops(device)
        if peak and "tflops" in result:
            result["mfu"] = result["tflops"] / peak
        if rank == 0:
            (report_train if args.cmd == "train" else report_generate)(args, result)
    if args.json and rank == 0:
        print(json.dumps(result))


if __name__ == "__main__":
    common.run(main)
