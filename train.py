"""
Hard distillation: supervised fine-tuning of Qwen3 on a teacher's reasoning traces, loss on answer tokens only.

The reference run (DeepSeek-R1 traces into Qwen3 0.6B Base):
    python train.py --data_path deepseek-r1-math-train --validation_size 25 --epochs 3 --lr 1e-5 \\
        --max_seq_len 2048 --use_think_tokens --grad_clip 1.0
Offline on a CPU:
    python data.py synth --out demo && python train.py --model tiny --data_path demo/train.json --out_dir out/tiny ...
"""
import argparse
import csv
import json
import math
import re
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import data
import qwen3

CSV_COLUMNS = ["epoch", "total_steps", "train_loss", "val_loss", "lr", "tokens_per_sec", "elapsed_s"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default="Qwen/Qwen3-0.6B-Base", help="student: Hub repo id, local HF-layout directory, or 'tiny' (random init)")
    a("--which_model", default="reasoning", choices=["base", "reasoning"],
      help="tokenizer variant: 'reasoning' chat-wraps prompts and ends answers with <|im_end|>, 'base' uses plain text and <|endoftext|>")
    a("--data_path", default="deepseek-r1-math-train", help=f"teacher JSON/JSONL file or partition: {', '.join(data.PARTITIONS)}")
    a("--dataset_size", type=int, default=None, help="use only the first N rows of the file")
    a("--validation_size", type=int, default=25, help="held-out examples for the validation loss")
    a("--epochs", type=int, default=2)
    a("--log_every", type=int, default=50, help="validation loss and a CSV row every N optimizer steps")
    a("--lr", type=float, default=5e-6, help="AdamW learning rate (constant)")
    a("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    a("--max_seq_len", type=int, default=2048, help="drop examples longer than this many tokens")
    a("--grad_clip_norm", "--grad_clip", type=float, default=None, help="clip the gradient norm to this value (off by default)")
    a("--seed", type=int, default=42, help="split, shuffling and tiny-model init")
    a("--use_think_tokens", action="store_true", help="wrap the teacher's reasoning in <think>...</think>")
    a("--checkpoint_path", default=None, help="initialise the weights from this checkpoint (no optimizer state; see --resume)")
    a("--resume", default=None, help="continue an interrupted run: its --out_dir or a resumable checkpoint (last.pth)")
    a("--out_dir", default="out", help="checkpoints, metrics.csv and args.json")
    a("--device", default="auto", help="auto = cuda, then mps, then cpu")
    a("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="auto = bfloat16 on cuda (as the reference), else float32")
    a("--batch_size", type=int, default=1, help="examples per micro-batch; 1 = the reference per-example loop")
    a("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--tokens_per_batch", type=int, default=0, help="also cap each micro-batch at this many padded tokens (0 = no cap)")
    a("--per_example_mean", action="store_true",
      help="loss = mean of per-example means (the reference's weighting); default: mean over all answer tokens of the step")
    a("--grad_checkpointing", action="store_true", help="recompute activations in the backward pass to save memory")
    a("--compile", action="store_true", help="torch.compile each transformer block")
    a("--cache_dir", default=None, help="downloads and token cache (default $DISTILL_CACHE or ~/.cache/reasoning-distill)")
    return p.parse_args(argv)


def checkpoint_name(model_name, step, epoch):
    size = "tiny" if model_name == "tiny" else (re.findall(r"Qwen3-([\d.]+B)", str(model_name)) or ["model"])[0]
    return f"qwen3-{size}-distill-step{step:05d}-epoch{epoch}.pth"


def load_examples(args, tok):
    """Tokenized, filtered, split examples, with every count printed; errors before any training work."""
    examples, skipped, num_rows = data.prepare_examples(args.data_path, tok, args.use_think_tokens, args.cache_dir)
    if args.dataset_size:
        examples = [e for e in examples if e["row"] < args.dataset_size]
        num_rows = min(num_rows, args.dataset_size)
    print(f"data: {num_rows} rows, {len(examples)} usable, skipped: {data.describe_skipped(skipped)}")
    if not examples:
        raise ValueError(f"no valid rows in {args.data_path} after preprocessing (skipped: {data.describe_skipped(skipped)})")
    examples, counts = data.filter_by_length(examples, args.max_seq_len)
    print(f"length filter <= {args.max_seq_len} tokens: kept {counts['kept']}, removed {counts['removed']}")
    train, val = data.split_examples(examples, args.validation_size, args.seed)
    print(f"split: {len(train)} train, {len(val)} validation")
    return train, val


def optimizer_steps(train, args, epoch):
    """This epoch's optimizer steps, each a list of micro-batches."""
    batches = data.make_batches(train, args.batch_size, args.seed * 1000 + epoch, args.tokens_per_batch)
    return [batches[i:i + args.grad_accum] for i in range(0, len(batches), args.grad_accum)]


def step_loss(model, step, per_example_mean, device, backward=True):
    """Loss of one optimizer step (all its micro-batches), with backward; returns (loss, trained tokens)."""
    examples = [e for b in step for e in b]
    normalizer = len(examples) if per_example_mean else sum(len(e["token_ids"]) - e["prompt_len"] for e in examples)
    total, tokens = 0.0, 0
    for batch in step:
        input_ids, targets, loss_mask = data.collate(batch, device)
        loss = qwen3.answer_loss(model, input_ids, targets, loss_mask, per_example_mean, normalizer)
        if backward:
            loss.backward()
        total += loss.item()
        tokens += sum(len(e["token_ids"]) - 1 for e in batch)  # padding is not counted
    return total, tokens


def optimizer_step(model, optimizer, step, args, device, pos):
    """Forward, backward, clip and update for one step; stop cleanly on out-of-memory or a non-finite loss."""
    examples = [e for batch in step for e in batch]
    try:
        loss, tokens = step_loss(model, step, args.per_example_mean, device)
    except torch.OutOfMemoryError:
        raise SystemExit(f"error: out of memory at step {pos['total_steps'] + 1} ({len(examples)} examples, longest "
                         f"{max(len(e['token_ids']) for e in examples)} tokens): lower --batch_size or --tokens_per_batch "
                         "or --max_seq_len, or add --grad_checkpointing")
    if not math.isfinite(loss):
        raise SystemExit(f"error: non-finite loss {loss} at step {pos['total_steps'] + 1} (epoch {pos['epoch']}), data rows "
                         f"{[e['row'] for e in examples]}; stopped without saving. Last good checkpoint: "
                         f"{pos['last_checkpoint'] or 'none'}")
    if args.grad_clip_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, tokens


@torch.no_grad()
def validation_loss(model, val, args, device):
    """Mean over validation examples of each example's answer loss (the reference's val loss)."""
    if not val:
        return float("nan")
    model.eval()
    batches = [val[i:i + args.batch_size] for i in range(0, len(val), args.batch_size)]
    total = sum(step_loss(model, [b], True, device, backward=False)[0] * len(b) for b in batches)
    model.train()
    return total / len(val)


def prepare_out_dir(args):
    """Refuse to overwrite a previous run; on --resume, return the resumable state."""
    if args.resume:
        path = Path(args.resume)
        path = path / "last.pth" if path.is_dir() else path
        state = qwen3.read_checkpoint(path)
        if "optimizer" not in state:
            raise ValueError(f"{path} holds weights only: resume needs the run's last.pth (use --checkpoint_path to start from weights)")
        resumed = argparse.Namespace(**state["args"])
        # the hardware and the directory's place may change, nothing else
        resumed.resume, resumed.device, resumed.out_dir = args.resume, args.device, str(path.parent)
        return resumed, state
    out = Path(args.out_dir)
    if (out / "metrics.csv").exists() or list(out.glob("*.pth")):
        raise ValueError(f"{out} already holds a run: continue it with --resume {out}, or choose another --out_dir")
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(args), indent=2))
    with open(out / "metrics.csv", "w", newline="") as f:
        csv.writer(f).writerow(CSV_COLUMNS)
    return args, None


@contextmanager
def deferred_signals():
    """Ctrl-C (SIGINT) and SIGTERM only raise a flag, checked after each step so that a resumable checkpoint can
    be written; a second Ctrl-C stops at once. The previous handlers come back afterwards."""
    caught = []
    def on_signal(signum, frame):
        if caught:
            raise KeyboardInterrupt
        caught.append(signum)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv=None):
    args, resume_state = prepare_out_dir(parse_args(argv))
    out = Path(args.out_dir)
    device = qwen3.pick_device(args.device)
    dtype = qwen3.pick_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    model = qwen3.load_model(args.model, device, dtype, args.cache_dir, args.seed)
    tok = qwen3.load_tokenizer(args.model, args.which_model, args.cache_dir)
    print(f"device {device} ({dtype}), model {args.model} ({model.num_params() / 1e6:.1f}M parameters), "
          f"tokenizer {tok.kind} (eos {tok.eos_token})")
    train, val = load_examples(args, tok)
    if args.checkpoint_path:
        qwen3.load_weights(model, qwen3.read_checkpoint(args.checkpoint_path, device), args.checkpoint_path)
    model.grad_checkpointing = args.grad_checkpointing
    if args.compile:
        model.compile_blocks()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.startswith("cuda") or None)
    steps_per_epoch = len(optimizer_steps(train, args, 1))
    total_steps = steps_per_epoch * args.epochs
    # progress state: everything a resumed run needs to continue exactly where this one stopped
    pos = {"epoch": 1, "step_in_epoch": 0, "total_steps": 0, "interval_loss": 0.0, "interval_steps": 0,
           "interval_tokens": 0, "epoch_loss": 0.0, "elapsed_s": 0.0, "csv_rows": 0, "last_checkpoint": None}
    if resume_state:
        qwen3.load_weights(model, resume_state, args.resume)
        optimizer.load_state_dict(resume_state["optimizer"])
        pos.update(resume_state["position"])
        torch.set_rng_state(resume_state["rng"])
        with open(out / "metrics.csv") as f:  # drop rows logged after the checkpoint
            rows = f.readlines()[:pos["csv_rows"] + 1]
        (out / "metrics.csv").write_text("".join(rows))
        print(f"resumed from {args.resume} at epoch {pos['epoch']}, step {pos['total_steps']}")
    print(f"{args.epochs} epochs x {steps_per_epoch} steps = {total_steps} optimizer steps "
          f"(batch {args.batch_size}, grad_accum {args.grad_accum}), lr {args.lr}")

    def save_resumable(path):
        return qwen3.save_checkpoint(path, model, tok, optimizer=optimizer.state_dict(), position=dict(pos),
                                     rng=torch.get_rng_state(), args=vars(args))

    def log(epoch, train_loss, val_loss, tokens_per_sec):
        with open(out / "metrics.csv", "a", newline="") as f:
            csv.writer(f).writerow([epoch, pos["total_steps"], f"{train_loss:.6f}", f"{val_loss:.6f}", args.lr,
                                    f"{tokens_per_sec:.0f}", f"{pos['elapsed_s']:.1f}"])
        pos["csv_rows"] += 1

    with deferred_signals() as interrupted:
        model.train()
        bar = qwen3.Progress(total_steps, "train", unit="steps")
        bar.update(pos["total_steps"])
        t0 = time.time() - pos["elapsed_s"]
        interval_start = time.time()
        while pos["epoch"] <= args.epochs:
            epoch = pos["epoch"]
            steps = optimizer_steps(train, args, epoch)
            for step in steps[pos["step_in_epoch"]:]:
                loss, tokens = optimizer_step(model, optimizer, step, args, device, pos)
                pos["step_in_epoch"] += 1
                pos["total_steps"] += 1
                pos["elapsed_s"] = time.time() - t0
                for key, value in (("interval_loss", loss), ("interval_steps", 1), ("interval_tokens", tokens), ("epoch_loss", loss)):
                    pos[key] += value
                bar.update()
                if pos["total_steps"] % args.log_every == 0:
                    val_loss = validation_loss(model, val, args, device)
                    tokens_per_sec = pos["interval_tokens"] / (time.time() - interval_start)
                    eta = (total_steps - pos["total_steps"]) * pos["elapsed_s"] / pos["total_steps"]
                    bar.write(f"[Epoch {epoch}/{args.epochs} Step {pos['total_steps']}/{total_steps}] "
                              f"train_loss {pos['interval_loss'] / pos['interval_steps']:.4f} val_loss {val_loss:.4f} "
                              f"| {tokens_per_sec:,.0f} tok/s | ETA {qwen3.format_seconds(eta)}")
                    log(epoch, pos["interval_loss"] / pos["interval_steps"], val_loss, tokens_per_sec)
                    pos.update(interval_loss=0.0, interval_steps=0, interval_tokens=0)
                    interval_start = time.time()
                if interrupted:
                    path = save_resumable(out / "last.pth")
                    bar.write(f"interrupted: saved {path}; continue with: python train.py --resume {out}")
                    raise SystemExit(130)
            val_loss = validation_loss(model, val, args, device)
            epoch_train_loss = pos["epoch_loss"] / max(len(steps), 1)
            bar.write(f"[Epoch {epoch}/{args.epochs} done] train_loss {epoch_train_loss:.4f} val_loss {val_loss:.4f}")
            log(epoch, epoch_train_loss, val_loss, pos["interval_tokens"] / max(time.time() - interval_start, 1e-9))
            path = qwen3.save_checkpoint(out / checkpoint_name(args.model, pos["total_steps"], epoch), model, tok,
                                         epoch=epoch, step=pos["total_steps"], val_loss=val_loss, args=vars(args))
            pos.update(epoch=epoch + 1, step_in_epoch=0, epoch_loss=0.0, last_checkpoint=str(path))
            save_resumable(out / "last.pth")
            bar.write(f"saved {path}")
        bar.close()
    print(f"done in {qwen3.format_seconds(time.time() - t0)}, peak memory {qwen3.peak_memory_gib(device):.2f} GiB; "
          f"wrote {out / 'metrics.csv'}, checkpoints in {out} (last: {pos['last_checkpoint']})")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, qwen3.DownloadError) as err:
        sys.exit(f"error: {err}")
