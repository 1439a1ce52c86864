"""
Benchmarks on synthetic inputs: training throughput / MFU / memory, generation throughput, data preparation.

    python bench.py train --model tiny --batch_size 16 --seq_len 256 --compare
    python bench.py train --model random-0.6B --device cuda --batch_size 8 --seq_len 2048 --compare
    python bench.py generate --model tiny --batch_size 16 --compare
    python bench.py data --tokenizer ../shared/qwen3-tokenizer/tokenizer.json
--json prints every figure as one JSON object on the last line.
"""
import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import qwen3
import train

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}  # dense bf16


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def detect_peak_tflops(device):
    if str(device).startswith("cuda"):
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def synthetic_examples(n, seq_len, vocab_size, seed):
    """Examples of 50-100% of seq_len tokens, the first quarter prompt: lengths vary as in real data."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        length = rng.randint(seq_len // 2, seq_len)
        examples.append({"token_ids": [rng.randrange(vocab_size) for _ in range(length)], "prompt_len": length // 4, "row": 0})
    return examples


def reference_step_loss(model, example, device):
    """The reference's loss: full logits of one example, cross-entropy from prompt_len - 1 on."""
    ids = torch.as_tensor(example["token_ids"], device=device).long()[None]
    logits = model(ids[:, :-1])
    start = example["prompt_len"] - 1
    return F.cross_entropy(logits[0, start:].float(), ids[0, start + 1:])


def time_training(model, steps, device, step_fn, warmup):
    """Seconds for the timed steps (after warm-up) and trained tokens in them."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=str(device).startswith("cuda") or None)
    tokens, start = 0, None
    for i, step in enumerate(steps):
        if i == warmup:
            sync(device)
            start, tokens = time.time(), 0
        tokens += step_fn(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.time() - start, tokens


def bench_train(args, model, device):
    examples = synthetic_examples(args.batch_size * (args.steps + args.warmup), args.seq_len, model.cfg.vocab_size, args.seed)
    model.train()
    model.grad_checkpointing = args.grad_checkpointing

    def fast_step(batch):  # exactly train.py's step: collate, chunked answer loss, backward
        return train.step_loss(model, [batch], False, device)[1]

    batches = data.make_batches(examples, args.batch_size, args.seed)
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds, tokens = time_training(model, batches, device, fast_step, args.warmup)
    flops_per_token = model.flops_per_token(args.seq_len * 3 // 4)  # the average length of the synthetic examples
    result = {"mode": "train", "tokens_per_sec": tokens / seconds, "step_time_s": seconds / args.steps,
              "tflops": flops_per_token * tokens / seconds / 1e12, "peak_memory_gib": qwen3.peak_memory_gib(device)}
    if args.compare:
        def reference_step(example):
            reference_step_loss(model, example, device).backward()
            return len(example["token_ids"]) - 1
        n = min(len(examples), args.batch_size * 4 + args.warmup)
        seconds, tokens = time_training(model, examples[:n], device, reference_step, args.warmup)
        result.update(baseline_tokens_per_sec=tokens / seconds, speedup=result["tokens_per_sec"] / (tokens / seconds))
    return result


def bench_generate(args, model, device):
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(model.cfg.vocab_size) for _ in range(rng.randint(args.seq_len // 2, args.seq_len))]
               for _ in range(args.batch_size)]
    model.eval()
    qwen3.generate(model, prompts[:2], 4)  # warm-up
    sync(device)
    start = time.time()
    out = qwen3.generate(model, prompts, args.max_new_tokens)
    sync(device)
    seconds = time.time() - start
    tokens = sum(map(len, out))
    result = {"mode": "generate", "tokens_per_sec": tokens / seconds, "peak_memory_gib": qwen3.peak_memory_gib(device)}
    if args.compare:
        start = time.time()
        singles = [qwen3.generate(model, [p], args.max_new_tokens)[0] for p in prompts]
        sync(device)
        baseline = sum(map(len, singles)) / (time.time() - start)
        result.update(baseline_tokens_per_sec=baseline, speedup=result["tokens_per_sec"] / baseline,
                      identical_to_sequential=singles == out)
    return result


def bench_data(args):
    """Tokenize a teacher file of realistic size (12,000 rows, ~100 MB made from real rows), cold and cached."""
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
        examples, _, _ = data.prepare_examples(path, tok, True, cache_dir=tmp)
        cold = time.time() - start
        start = time.time()
        data.prepare_examples(path, tok, True, cache_dir=tmp)
        cached = time.time() - start
    tokens = sum(len(e["token_ids"]) for e in examples)
    return {"mode": "data", "rows": args.rows, "file_mb": size_mb, "tokens": tokens, "cold_s": cold, "cached_s": cached,
            "cold_tokens_per_sec": tokens / cold}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("mode", choices=["train", "generate", "data"])
    p.add_argument("--model", default="tiny", help="'tiny', 'random-0.6B' (Qwen3-0.6B shape, no download), a Hub repo id or a local directory")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="auto = bfloat16 on cuda")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=256, help="longest example / prompt (lengths vary from half of it)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--max_new_tokens", type=int, default=64, help="generate: tokens per prompt")
    p.add_argument("--compare", action="store_true", help="also run the per-example / sequential baseline; print the speedup")
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="train: torch.compile each transformer block")
    p.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (detected for common GPUs)")
    p.add_argument("--tokenizer", default="Qwen/Qwen3-0.6B", help="data: tokenizer.json, model directory or repo id")
    p.add_argument("--sample_rows", default=str(Path(__file__).parent / "tests" / "data" / "teacher_sample.json"),
                   help="data: real teacher rows to build the 12,000-row file from")
    p.add_argument("--rows", type=int, default=12000)
    p.add_argument("--repeat_thinking", type=int, default=3, help="data: repeat each trace to reach the real rows' ~9 kB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print all figures as JSON on the last line")
    args = p.parse_args(argv)
    if args.compile and args.mode != "train":
        p.error("--compile is for training: decoding changes shapes every step, and compiled blocks would recompile")
    return args


def main(argv=None):
    args = parse_args(argv)

    if args.mode == "data":
        result = bench_data(args)
        print(f"tokenized {result['rows']} rows ({result['file_mb']:.0f} MB, {result['tokens'] / 1e6:.1f}M tokens): "
              f"cold {result['cold_s']:.1f} s, cached {result['cached_s']:.2f} s")
    else:
        device = qwen3.pick_device(args.device)
        dtype = qwen3.pick_dtype(args.dtype, device)
        model = qwen3.load_model(args.model, device, dtype, seed=args.seed)
        if args.compile:
            model.compile_blocks()
        result = (bench_train if args.mode == "train" else bench_generate)(args, model, device)
        peak = args.peak_tflops or detect_peak_tflops(device)
        result.update(model=args.model, device=torch.cuda.get_device_name() if device.startswith("cuda") else device,
                      dtype=str(dtype).replace("torch.", ""), batch_size=args.batch_size, seq_len=args.seq_len)
        if peak and "tflops" in result:
            result["mfu"] = result["tflops"] / peak
        print(f"{args.mode} on {result['device']} ({result['dtype']}), batch {args.batch_size}: "
              f"{result['tokens_per_sec']:,.0f} tokens/s" +
              (f", {result['tflops']:.2f} TFLOP/s" if "tflops" in result else "") +
              (f", MFU {100 * result['mfu']:.1f}%" if "mfu" in result else "") +
              f", peak memory {result['peak_memory_gib']:.2f} GiB")
        if args.compare:
            print(f"baseline ({'per-example, full logits' if args.mode == 'train' else 'one prompt at a time'}): "
                  f"{result['baseline_tokens_per_sec']:,.0f} tokens/s -> speedup {result['speedup']:.1f}x")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, qwen3.DownloadError) as err:
        raise SystemExit(f"error: {err}")
