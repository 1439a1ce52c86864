"""
Distillation: fine-tune Qwen3 on a teacher's reasoning traces, with the loss on the answer tokens only.

Hard distillation (the reference chapter) imitates the teacher's text by cross-entropy. Soft distillation
(--teacher or --teacher_logits) also pulls the student's next-token probabilities towards the teacher's;
on-policy distillation (--on_policy) does it on answers the student writes itself.

The reference run, DeepSeek-R1 traces into Qwen3 0.6B Base (--precision pure-bfloat16 for its exact numerics):
    python train.py --data_path deepseek-r1-math-train --validation_size 25 --epochs 3 --lr 1e-5 \\
        --max_seq_len 2048 --use_think_tokens --grad_clip 1.0
The same on 8 GPUs (each optimizer step then takes 8 examples, one per GPU):
    torchrun --standalone --nproc_per_node 8 train.py --data_path deepseek-r1-math-train ...
Offline on a CPU: bash walkthrough.sh
"""
import argparse
import csv
import json
import math
import re
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import common
import data
import qwen3
import teacher

CSV_COLUMNS = ["epoch", "total_steps", "train_loss", "val_loss", "lr", "tokens_per_sec", "elapsed_s",
               "train_ce", "train_kd", *(f"rollout_{k}" for k in ("len", "cut", "boxed", "kd")), "rollout_s",
               "teacher_s", "update_s"]
# training precision: (weights and AdamW state dtype, autocast dtype of the matmuls)
PRECISIONS = {"float32": (torch.float32, None), "bfloat16": (torch.float32, torch.bfloat16),
              "pure-bfloat16": (torch.bfloat16, None), "bfloat16-sr": (torch.bfloat16, None)}
# flags that --resume accepts with a new value: they change where and how fast a run goes, not what it learns
RESUME_MAY_CHANGE = {"resume", "out_dir", "device", "epochs", "log_every", "cache_dir", "compile",
                     "grad_checkpointing", "teacher_device"}


def parse_args(argv=None, namespace=None):
    p = common.parser(__doc__)
    a = p.add_argument
    # the reference's flags, with its defaults
    a("--data_path", default="deepseek-r1-math-train",
      help=f"teacher JSON/JSONL file or partition: {', '.join(data.PARTITIONS)}")
    a("--dataset_size", type=int, default=None, help="use only the first N rows of the file")
    a("--validation_size", type=int, default=25, help="held-out examples for the validation loss")
    a("--epochs", type=int, default=2)
    a("--log_every", type=int, default=50, help="validation loss and a CSV row every N optimizer steps")
    a("--lr", type=float, default=5e-6, help="AdamW learning rate (the peak, with a schedule)")
    a("--max_seq_len", type=int, default=2048, help="drop examples longer than this many tokens")
    a("--checkpoint_path", default=None, help="initialise the weights from this checkpoint of train.py (a "
      ".pth file or a run directory; no optimizer state: see --resume)")
    a("--grad_clip_norm", "--grad_clip", type=float, default=None,
      help="clip the gradient norm to this value (off by default)")
    a("--seed", type=int, default=42, help="split, shuffling and random init")
    a("--use_think_tokens", action="store_true", help="wrap the teacher's reasoning in <think>...</think>")
    # the student
    a("--model", default="Qwen/Qwen3-0.6B-Base", help="Hub repo id, Hugging Face-layout directory, or a "
      "random model ('tiny', 'random-0.6B')")
    a("--which_model", default="reasoning", choices=["base", "reasoning"], help="tokenizer variant: the "
      "reference trains the student to answer in the chat template ('reasoning', ending at <|im_end|>)")
    # which rows
    a("--decontaminate", action="store_true", help="drop the rows whose problem overlaps the evaluation set "
      "(--against); pass it for your own data (default: report them)")
    a("--against", default="math500", help="the evaluation set the data must not overlap: a set by name "
      "(checked once downloaded, as evaluate.py does) or a JSON/JSONL file with a 'problem' per row")
    a("--only_correct", action="store_true", help="rejection sampling: keep only the rows whose "
      "message_content the checker grades right against gtruth_answer (every correct sample of a problem)")
    # schedule and batches
    a("--lr_schedule", default="constant", choices=["constant", "cosine", "linear"],
      help="after warmup: keep --lr, or decay it to --min_lr at the last step")
    a("--warmup_steps", type=int, default=0, help="raise the learning rate linearly over the first N steps")
    a("--min_lr", type=float, default=0.0, help="where the cosine or linear decay ends")
    a("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    a("--batch_size", type=int, default=1,
      help="examples per micro-batch; 1 = the reference per-example loop")
    a("--grad_accum", type=int, default=1, help="micro-batches per optimizer step (per process)")
    a("--tokens_per_batch", type=int, default=0, help="also cap a micro-batch's padded tokens (0 = no cap)")
    a("--per_example_mean", action="store_true", help="loss = mean of per-example means (the reference's "
      "weighting); default: mean over the step's answer tokens")
    # precision and speed
    a("--precision", "--dtype", default="auto", choices=["auto", *PRECISIONS],
      help="bfloat16: float32 weights and AdamW state, bfloat16 matmuls (every update kept); pure-bfloat16: "
           "everything in bfloat16 as the reference (small updates are rounded away); bfloat16-sr: "
           "pure-bfloat16's memory, AdamW rounding stochastically (small updates kept on average); float32: "
           "true float32 matmuls, TF32 off (the exact mode, slow on GPUs); auto = bfloat16 on cuda, float32 "
           "elsewhere")
    a("--grad_checkpointing", action="store_true", help="recompute activations in the backward pass")
    a("--compile", action="store_true", help="torch.compile each transformer block")
    # a teacher model: soft and on-policy distillation
    a("--teacher", default=None, help="soft distillation from this model: Hub repo id, Hugging Face "
      "directory or checkpoint; it must share the student's tokenizer")
    a("--teacher_logits", default=None, help="soft distillation from a file of the teacher's top-k "
      "log-probabilities (python data.py teacher-logits)")
    a("--teacher_device", default=None, help="where the --teacher runs (default: with the student)")
    a("--kd_weight", type=float, default=0.5,
      help="with a teacher: loss = (1 - w) * CE + w * KD; 0 = hard distillation")
    a("--kd_loss", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"],
      help="KD term: KL(teacher || student), KL(student || teacher), or the generalised Jensen-Shannon "
           "divergence with --jsd_beta")
    a("--jsd_beta", type=float, default=0.5, help="jsd: weight of the teacher in the mixture, in (0, 1)")
    a("--kd_temperature", type=float, default=1.0, help="soften both distributions; KD is scaled by T^2")
    a("--on_policy", type=float, default=0.0, help="on-policy distillation: the share of each step's "
      "examples whose answers the student writes itself, to be scored token by token by the --teacher (KD "
      "only; --kd_loss reverse_kl recommended); 1 = all, and then a file of problems without teacher text "
      "will do")
    a("--rollout_temperature", type=float, default=1.0, help="on-policy: sampling temperature of the "
      "student's answers (no top-p or top-k: its own distribution)")
    a("--rollout_max_new_tokens", type=int, default=2048, help="on-policy: the cap on a student's answer "
      "(keep it above the answers' length: the student must practise finishing)")
    a("--samples_per_prompt", type=int, default=1, help="on-policy: answers the student writes per example")
    # processes and the run
    a("--fsdp", action="store_true", help="under torchrun: shard weights, gradients and AdamW state "
      "(FSDP2) instead of replicating them (DDP), for students that do not fit")
    a("--out_dir", default="out", help="checkpoints, metrics.csv and args.json")
    a("--resume", nargs="?", const="", default=None, metavar="OUT_DIR", help="continue the interrupted run "
      "in --out_dir (or in the directory, or last.pth, given); with --epochs N, extend it to N epochs")
    a("--device", default="auto", help="auto = cuda, then mps, then cpu")
    a("--cache_dir", default=None, help="downloads and token cache "
      "(default $DISTILL_CACHE or ~/.cache/reasoning-distill)")
    return p.parse_args(argv, namespace)


# -----------------------------------------------------------------------------
# The training run: the reference's loop, numbered as there; each extension is one call into a place named
# after it (teacher.py for soft and on-policy distillation, common.py for processes, precision below)


def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = common.init_processes(args.device)
    say = print if rank == 0 else (lambda *a, **k: None)  # the first process prints, logs and writes files
    args, resumed = resume_args(args, argv, world_size, say) if args.resume is not None else (args, None)
    run = Run.begin(args, resumed, world_size, rank)
    if run.epoch > args.epochs:
        return say(f"{run.out} is complete ({args.epochs} epochs): to train on, pass a larger --epochs")
    check_on_policy(args)
    precision = pick_precision(args.precision, device, args.fsdp)
    _, weights_dtype, autocast_dtype = precision
    sharded = args.fsdp and world_size > 1  # FSDP casts for compute itself; one process has nothing to shard
    use_autocast = autocast_dtype and not sharded
    autocast = torch.autocast(device.split(":")[0], autocast_dtype) if use_autocast else None

    # the student, its tokenizer, the data, and a teacher to learn from besides the traces
    torch.manual_seed(args.seed)
    model = qwen3.load_model(args.model, device, weights_dtype, args.cache_dir, args.seed)
    tok = qwen3.load_tokenizer(args.model, args.which_model, args.cache_dir)
    fsdp = " (FSDP)" if sharded else " (--fsdp: one process, nothing to shard)" if args.fsdp else ""
    say(f"device {device} x {world_size} processes{fsdp}, precision {describe_precision(precision)}, model "
        f"{args.model} ({model.num_params() / 1e6:.1f}M parameters), tokenizer {tok.kind} "
        f"(eos {tok.eos_token})")
    train_set, val = load_examples(args, tok, say)
    soft, rollouts = load_teacher(args, tok, model, train_set, device, autocast_dtype or weights_dtype)
    start = resumed or args.checkpoint_path and qwen3.read_checkpoint(args.checkpoint_path, mmap=True)
    if start:
        qwen3.load_weights(model, start, args.resume or args.checkpoint_path)
    model.grad_checkpointing = args.grad_checkpointing
    if args.compile:
        model.compile_blocks()
    trained = common.distribute(model, args.fsdp, autocast_dtype, world_size)  # DDP or FSDP under torchrun
    optimizer = adamw(trained.parameters(), device, args.lr, args.weight_decay, precision[0], args.seed)
    if resumed:
        common.load_optimizer_state(trained, optimizer, resumed["optimizer"])
        torch.set_rng_state(resumed["rng"])
    steps_per_epoch = len(optimizer_steps(train_set, args, 1, world_size))
    total_steps = steps_per_epoch * args.epochs
    check_schedule(args, total_steps)
    say(f"{args.epochs} epochs x {steps_per_epoch} steps = {total_steps} optimizer steps of up to "
        f"{args.batch_size * args.grad_accum * world_size} examples (batch {args.batch_size} x grad_accum "
        f"{args.grad_accum} x {world_size} processes), lr {args.lr} {args.lr_schedule}, warmup "
        f"{args.warmup_steps}" + (f", KD {args.kd_loss} weight {args.kd_weight} T {args.kd_temperature}"
                                   if soft else "")
        + (f", on-policy {args.on_policy:g} (temperature {args.rollout_temperature:g}, at most "
           f"{args.rollout_max_new_tokens} tokens, {args.samples_per_prompt} per prompt)"
           if rollouts else ""))
    run.open_files(say)  # only now: a run that fails to start leaves nothing behind

    with deferred_signals() as interrupted:
        trained.train()
        bar = qwen3.Progress(total_steps, "train", unit="steps", quiet=rank > 0)
        bar.update(run.total_steps)
        run.start_clock()
        while run.epoch <= args.epochs:
            steps = optimizer_steps(train_set, args, run.epoch, world_size)
            for micro_batches in steps[run.step_in_epoch:]:
                # 1. the learning rate of this step
                lr = learning_rate(run.total_steps, total_steps, args)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                # 2. the loss and its gradients, over this process's micro-batches (one, in the reference
                #    loop); on-policy, the student first writes its answers to some of them
                optimizer.zero_grad(set_to_none=True)
                ce, kd, tokens, rollout = forward_backward(trained, micro_batches, args, device, rank,
                                                           world_size, autocast, soft, rollouts, run.epoch)
                # 3. every process learns the step's sums, and whether any of them was asked to stop
                ce, kd, tokens, stop, *sums = common.all_sum([ce, kd, tokens, len(interrupted),
                                                              *rollout.values()], device)
                rollout = dict(zip(rollout, sums))
                if not math.isfinite(ce + kd + rollout.get("kd", 0.0)):
                    raise SystemExit(run.failed(micro_batches))
                # 4. clip the gradient norm
                if args.grad_clip_norm:
                    torch.nn.utils.clip_grad_norm_(trained.parameters(), args.grad_clip_norm)
                # 5. update the weights
                optimizer.step()
                run.add(ce, kd, tokens, rollout)
                bar.update()
                # 6. every log_every steps: the validation loss and a CSV row
                if run.total_steps % args.log_every == 0:
                    val_loss = validation_loss(trained, val, args, device, rank, world_size, autocast)
                    bar.write(run.log(val_loss, lr, total_steps))
                # 7. Ctrl-C or SIGTERM, to any process: a resumable checkpoint, then stop
                if stop:
                    run.save(run.out / "last.pth", trained, optimizer, tok, resumable=True)
                    bar.write(f"interrupted: saved {run.out / 'last.pth'}; continue with: "
                              f"python train.py --resume {run.out}")
                    raise SystemExit(130)
            # 8. the end of an epoch: validation loss, CSV row, the epoch's checkpoint and a resumable one
            val_loss = validation_loss(trained, val, args, device, rank, world_size, autocast)
            bar.write(run.log(val_loss, learning_rate(run.total_steps - 1, total_steps, args), total_steps,
                              epoch_end=True))
            path = run.save(run.out / checkpoint_name(args.model, run.total_steps, run.epoch), trained,
                            optimizer, tok, epoch=run.epoch, step=run.total_steps, val_loss=val_loss)
            run.end_epoch(path)
            run.save(run.out / "last.pth", trained, optimizer, tok, resumable=True)
            bar.write(f"saved {path}")
        bar.close()
    say(f"done in {qwen3.format_seconds(run.clock())}, peak memory {common.peak_memory_gib(device):.2f} GiB "
        f"per process; wrote {run.out / 'metrics.csv'}, checkpoints in {run.out} "
        f"(last: {run.last_checkpoint})")


# -----------------------------------------------------------------------------
# The loss: cross-entropy on the answer tokens, plus a KD term with a teacher. It is computed from the final
# hidden states in chunks of positions, forward and backward, so that [tokens, 151,936] logits exist for one
# chunk at a time; plain_answer_loss below is the same loss the simple way, for reading and testing.


class ChunkedHeadLoss(torch.autograd.Function):
    """Sum over chunks of chunk_loss(hidden[rows] @ head^T as float32, rows): one chunk's logits at a time.
    The backward recomputes each chunk's logits and asks autograd for d loss / d logits, so any loss written
    on logits works; the head's matmuls run in `dtype` (bfloat16 tensor cores under mixed precision) and its
    gradient is summed over chunks in float32."""

    @staticmethod
    def forward(ctx, hidden, head, chunk_loss, dtype, chunk_size):
        ctx.save_for_backward(hidden, head)
        ctx.chunk_loss, ctx.dtype, ctx.chunk_size = chunk_loss, dtype, chunk_size
        h, w = hidden.to(dtype), head.to(dtype)
        return sum(chunk_loss((h[rows] @ w.t()).float(), rows) for rows in _chunks(len(h), chunk_size))

    @staticmethod
    def backward(ctx, grad_out):
        hidden, head = ctx.saved_tensors
        h, w = hidden.to(ctx.dtype), head.to(ctx.dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_head = torch.zeros_like(head, dtype=torch.float32)
        for rows in _chunks(len(h), ctx.chunk_size):
            logits = (h[rows] @ w.t()).float().requires_grad_()
            with torch.enable_grad():
                (grad_logits,) = torch.autograd.grad(ctx.chunk_loss(logits, rows), logits, grad_out)
            # column-major: both products read it as it lies (CPUs without bfloat16 matmuls fall back to a
            # generic kernel, which is far slower on the row-major layout)
            grad_logits = grad_logits.t().to(ctx.dtype, memory_format=torch.contiguous_format).t()
            grad_hidden[rows] = grad_logits @ w
            grad_head += grad_logits.t() @ h[rows]
        return grad_hidden, grad_head.to(head.dtype), None, None, None


def _chunks(n, size):
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def answer_loss(model, batch, example_weights, device, soft=None, chunk_size=512):
    """(cross-entropy, KD) summed over the batch's answer tokens, each token weighted by its example's weight
    (see token_weights). soft: the teacher's targets (Teacher or TeacherLogits); without one KD is 0."""
    input_ids, targets, mask = data.collate(batch)
    # the answer positions, their targets and weights, found on the host: a mask applied on the device would
    # make it stop and say how many there are
    answers = mask.flatten().nonzero().squeeze(1)
    weights = torch.repeat_interleave(torch.tensor(example_weights), mask.sum(1))
    input_ids, answers, targets, weights = (qwen3.to_device(t, device)
                                            for t in (input_ids, answers, targets[mask], weights))
    targets_kd = soft.targets(batch, input_ids, answers) if soft else None

    def chunk_loss(logits, rows):  # the per-token terms, float32
        ce = F.cross_entropy(logits, targets[rows], reduction="none")
        kd = soft.divergence(logits, targets_kd, rows) if soft else torch.zeros_like(ce)
        return torch.stack([(ce * weights[rows]).sum(), (kd * weights[rows]).sum()])

    def loss_fn(hidden, head):
        device = hidden.device.type  # the matmuls' dtype: autocast's where it is on, else the weights'
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else head.dtype
        return ChunkedHeadLoss.apply(hidden.flatten(0, 1)[answers], head, chunk_loss, dtype, chunk_size)

    return model(input_ids, loss_fn=loss_fn)


def plain_answer_loss(model, batch, example_weights, device):
    """The same cross-entropy the simple way, as in the reference: full logits, then the answer positions."""
    input_ids, targets, mask = data.collate(batch, device)
    ce = F.cross_entropy(model(input_ids)[mask].float(), targets[mask], reduction="none")
    return (ce * torch.repeat_interleave(torch.tensor(example_weights, device=device), mask.sum(1))).sum()


def token_weights(batch, step_count, step_tokens, per_example_mean):
    """The weight of each answer token of each example of `batch`, such that the weighted sum over the whole
    optimizer step (step_count examples, step_tokens answer tokens) is the mean over its answer tokens, or the
    mean of per-example means: so any split of a step into micro-batches and processes trains exactly as one
    big batch."""
    if per_example_mean:
        return [1.0 / (step_count * answer_len(e)) for e in batch]
    return [1.0 / step_tokens] * len(batch)


def answer_len(example):
    return len(example["token_ids"]) - example["prompt_len"]


# -----------------------------------------------------------------------------
# One optimizer step, over micro-batches and processes


def optimizer_steps(train, args, epoch, world_size):
    """This epoch's optimizer steps, each grad_accum x world_size micro-batches of similar length."""
    per_step = args.grad_accum * world_size
    seed = args.seed * 1000 + epoch  # a new order each epoch, the same on every process and after resume
    batches = data.make_batches(train, args.batch_size, seed, args.tokens_per_batch, per_step)
    return [batches[i:i + per_step] for i in range(0, len(batches), per_step)]


def rank_share(batches, rank, world_size):
    """This process's batches: every world_size-th one, as (batch, weight) pairs. Every process gets as many:
    where the batches run out, a stand-in of weight 0 takes part in the collectives (a process that skips
    them would make the others wait forever)."""
    mine = [(b, 1.0) for b in batches[rank::world_size]]
    return mine + [(batches[0], 0.0)] * (math.ceil(len(batches) / world_size) - len(mine))


def forward_backward(model, micro_batches, args, device, rank=0, world_size=1, autocast=None, soft=None,
                     rollouts=None, epoch=1):
    """Loss and gradients of one optimizer step, this process's share of it. Returns this process's part of
    the step's (cross-entropy, KD) losses on teacher text and the tokens it trained on, and on-policy the sums
    of its rollouts (teacher.Rollouts.answer) with the step's time split; summed over processes, they are the
    step's (the gradients are summed by DDP)."""
    start = time.time()
    share = [(batch, weight, False) for batch, weight in rank_share(micro_batches, rank, world_size)]
    step_examples = [e for batch in micro_batches for e in batch]
    step_count, step_tokens = len(step_examples), sum(map(answer_len, step_examples))
    stats = {}
    if rollouts:  # on-policy: the student first writes its own answers for its share's chosen examples
        share, stats = rollouts.answer(model, share, epoch)
        mine = [e for batch, weight, _ in share if weight for e in batch]  # the step's totals, all processes
        step_count, step_tokens = common.all_sum([len(mine), sum(map(answer_len, mine))], device)
    ce_sum = kd_sum = tokens = 0.0
    for i, (batch, weight, written) in enumerate(share):
        with common.gradient_sync(model, i == len(share) - 1), autocast or nullcontext():
            # DDP and FSDP average gradients over processes: scale by world_size to sum them instead
            weights = [w * weight * world_size
                       for w in token_weights(batch, step_count, step_tokens, args.per_example_mean)]
            ce_kd = answer_loss(model, batch, weights, device, soft)
            if written:  # the student's own text: no cross-entropy, the teacher's score of every token
                loss = ce_kd[1]
            else:
                loss = (1 - args.kd_weight) * ce_kd[0] + args.kd_weight * ce_kd[1] if soft else ce_kd[0]
        loss.backward()
        ce, kd = ce_kd.detach().double()  # kept on the device: the step reads its sums once (all_sum)
        if written:  # the KD sum is a share of the step's mean: undo the token weight to log it per token
            stats.update(kd=stats["kd"] + kd / world_size, kd_per_token=stats["kd_per_token"]
                         + kd * step_tokens / world_size)
        else:
            ce_sum, kd_sum = ce_sum + ce / world_size, kd_sum + kd / world_size
        tokens += weight * sum(len(e["token_ids"]) - 1 for e in batch)  # real tokens: padding is not counted
    if rollouts:  # the step's time in its three parts, and the step itself, as means over the processes
        stats["teacher_s"], soft.seconds = soft.seconds, 0.0
        stats["update_s"] = time.time() - start - stats["rollout_s"] - stats["teacher_s"]
        stats.update({k: stats[k] / world_size for k in ("rollout_s", "teacher_s", "update_s")},
                     steps=1 / world_size)
    return ce_sum, kd_sum, tokens, stats


@torch.no_grad()
def validation_loss(model, val, args, device, rank=0, world_size=1, autocast=None):
    """Mean over validation examples of each example's answer loss (the reference's val loss: cross-entropy
    only, so runs with and without a teacher compare)."""
    val = [e for e in val if data.has_teacher_text(e)]
    if not val:  # (prompts without teacher text, on-policy, have no validation loss)
        return float("nan")
    model.eval()
    batches = [val[i:i + args.batch_size] for i in range(0, len(val), args.batch_size)]
    total = 0.0
    for batch, weight in rank_share(batches, rank, world_size):
        with autocast or nullcontext():
            total += answer_loss(model, batch, [weight / answer_len(e) for e in batch], device)[0].double()
    model.train()
    return common.all_sum([total], device)[0] / len(val)


def learning_rate(step, total_steps, args):
    """The learning rate of optimizer step `step` (from 0): linear warmup, then constant or a decay that
    reaches --min_lr at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_schedule == "constant":
        return args.lr
    progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps - 1)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if args.lr_schedule == "cosine" else 1 - progress
    return args.min_lr + (args.lr - args.min_lr) * decay


# -----------------------------------------------------------------------------
# Precision: where the weights live, where the matmuls run (PRECISIONS), and the optimizer that goes with it


def pick_precision(name, device, fsdp=False):
    """(mode, weights dtype, autocast dtype) for --precision; an error if the device cannot run it."""
    if name == "auto":
        name = "bfloat16" if device.startswith("cuda") else "float32"
    if "bfloat16" in name and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--precision {name}: this GPU has no bfloat16; use --precision float32")
    if name == "bfloat16-sr" and fsdp:
        raise ValueError("--precision bfloat16-sr with --fsdp is not supported: its AdamW rounds whole "
                         "tensors, and FSDP2 hands it shards; use DDP (no --fsdp), or --fsdp with "
                         "--precision bfloat16")
    return (name, *PRECISIONS[name])


def describe_precision(precision):
    """What the precision mode means, as the run prints it: where the weights live, where the matmuls run."""
    mode, weights_dtype, compute_dtype = precision
    name = lambda dtype: str(dtype).replace("torch.", "")
    return f"{mode} ({name(weights_dtype)} weights, {name(compute_dtype or weights_dtype)} matmuls)"


def adamw(parameters, device, lr, weight_decay, precision="float32", seed=0):
    """AdamW, fused into one kernel per step where PyTorch has one (CUDA, CPU) rather than one operation per
    tensor. Under bfloat16-sr, the stochastically rounding AdamW below."""
    if precision == "bfloat16-sr":
        return StochasticRoundingAdamW(parameters, lr=lr, weight_decay=weight_decay, seed=seed)
    fused = device.split(":")[0] in ("cuda", "cpu")
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused or None)


def round_stochastic_(exact, generator):
    """Round float32 values in place to the bfloat16 neighbour below or above at random, the one above with
    the probability of how far the value lies towards it: right on average. A bfloat16 is the top 16 bits of
    a float32, so: add 16 random low bits (a carry into the top half has that probability), cut them off.
    The result converts to bfloat16 exactly."""
    noise = torch.empty_like(exact, dtype=torch.int32).random_(generator=generator).bitwise_and_(0xFFFF)
    exact.view(torch.int32).add_(noise).bitwise_and_(-1 << 16)
    return exact


class StochasticRoundingAdamW(torch.optim.Optimizer):
    """AdamW for bfloat16 weights that keeps small updates (--precision bfloat16-sr). Each step is computed in
    float32 and rounded back to bfloat16 stochastically: an update of a tenth of the bfloat16 spacing moves
    its weight by one spacing, one step in ten, where round-to-nearest (pure-bfloat16) drops it every time.
    The second moment needs it too (decaying by 0.1% a step, under half of bfloat16's relative spacing of
    0.4-0.8%, it would never decay); the first moment moves by 10% of the gradient's difference a step and
    rounds to nearest. Memory is pure bfloat16's: the float32 values exist for one bucket of elements at a
    time. The random stream is part of the state (resume is exact), and the same on every process (DDP
    replicas stay equal)."""

    def __init__(self, params, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8, seed=0):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps))
        device = self.param_groups[0]["params"][0].device
        self.generator = torch.Generator(device).manual_seed(seed)
        # Elements updated together, across tensors: on a CPU as many as stay in its cache; on a GPU enough
        # that each of the ~25 operations of an update is one kernel over many tensors (at one kernel per
        # operation per tensor, the launches would take longer than the work)
        self.bucket = 1 << 18 if device.type == "cpu" else 1 << 24

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            by_step = {}  # the bias corrections depend on each tensor's step count
            for p in (p for p in group["params"] if p.grad is not None):
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                four = p, p.grad, state["exp_avg"], state["exp_avg_sq"]
                by_step.setdefault(state["step"], []).append(four)
            for step, tensors in by_step.items():
                bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
                for w, g, m, v in self.buckets(tensors):  # each a list of flat pieces of the tensors
                    g32, m32, v32, w32 = (torch.cat(x).float() if len(x) > 1 else x[0].float()
                                          for x in (g, m, v, w))  # float32 copies, one bucket long
                    m32.lerp_(g32, 1 - beta1)
                    v32.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
                    w32.mul_(1 - lr * decay)
                    w32.addcdiv_(m32, v32.div(bias2).sqrt_().add_(eps), value=-lr / bias1)
                    sizes = [len(x) for x in w]
                    torch._foreach_copy_(m, m32.split(sizes))
                    torch._foreach_copy_(v, round_stochastic_(v32, self.generator).split(sizes))
                    torch._foreach_copy_(w, round_stochastic_(w32, self.generator).split(sizes))

    def buckets(self, tensors):
        """The (weight, gradient, first and second moment) tensors, flattened and cut into buckets of at most
        self.bucket elements: each bucket four lists of the pieces in it."""
        bucket, size = [[], [], [], []], 0
        for four in tensors:
            for pieces in zip(*(t.view(-1).split(self.bucket) for t in four)):
                if size + len(pieces[0]) > self.bucket:
                    yield bucket
                    bucket, size = [[], [], [], []], 0
                for column, piece in zip(bucket, pieces):
                    column.append(piece)
                size += len(pieces[0])
        if size:
            yield bucket

    def state_dict(self):
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state_dict):
        self.generator.set_state(state_dict["generator"])
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "generator"})


# -----------------------------------------------------------------------------
# Run state: where a run is, its running sums, its files


@dataclass
class Run:
    """Where a run is and its running sums: all that a resumed run needs to go on as if it never stopped
    (saved in last.pth as its "position"). Besides: the run's arguments and directory, and its clock."""
    epoch: int = 1
    step_in_epoch: int = 0
    total_steps: int = 0
    elapsed_s: float = 0.0
    interval_ce: float = 0.0  # sums since the last CSV row
    interval_kd: float = 0.0
    interval_steps: int = 0
    interval_tokens: float = 0.0
    interval_start_s: float = 0.0  # elapsed_s when the interval began (validation is not counted)
    epoch_ce: float = 0.0  # sums since the epoch began
    epoch_kd: float = 0.0
    epoch_written_kd: float = 0.0  # on-policy: the KD on the student's own answers
    rollout: dict = field(default_factory=dict)  # on-policy sums since the last CSV row (Rollouts.answer)
    csv_rows: int = 0
    last_checkpoint: str = ""
    world_size: int = 1

    @classmethod
    def begin(cls, args, resumed, world_size, rank):
        """A new run, or a resumed one where it stopped; a new one may not take a directory holding a run."""
        run = cls(**{**(resumed["position"] if resumed else {}), "world_size": world_size})
        run.args, run.out, run.first, run.resumed = args, Path(args.out_dir), rank == 0, bool(resumed)
        if not resumed:
            check_out_dir(run.out)
        return run

    def open_files(self, say):
        """args.json, and metrics.csv: its header, or a resumed run's rows up to its checkpoint (the rows
        after it are about to be logged again)."""
        if not self.first:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "args.json").write_text(json.dumps(vars(self.args), indent=2))
        if self.resumed:
            rows = (self.out / "metrics.csv").read_text().splitlines(keepends=True)[:self.csv_rows + 1]
            (self.out / "metrics.csv").write_text("".join(rows))
            say(f"resumed from {self.args.resume} at epoch {self.epoch}, step {self.total_steps}")
        else:
            (self.out / "metrics.csv").write_text(",".join(CSV_COLUMNS) + "\n")

    def start_clock(self):
        self.started = time.time() - self.elapsed_s  # elapsed_s goes on from where a resumed run stopped

    def clock(self):
        return time.time() - self.started

    def add(self, ce, kd, tokens, rollout):
        """One optimizer step's sums over all processes."""
        self.step_in_epoch, self.total_steps = self.step_in_epoch + 1, self.total_steps + 1
        self.interval_ce, self.interval_kd = self.interval_ce + ce, self.interval_kd + kd
        self.epoch_ce, self.epoch_kd = self.epoch_ce + ce, self.epoch_kd + kd
        self.interval_steps, self.interval_tokens = self.interval_steps + 1, self.interval_tokens + tokens
        self.rollout = {k: self.rollout.get(k, 0.0) + v for k, v in rollout.items()}
        self.epoch_written_kd += rollout.get("kd", 0.0)
        self.elapsed_s = self.clock()

    def log(self, val_loss, lr, total_steps, epoch_end=False):
        """A CSV row, and the line to print: every log_every steps for the steps since the last row, at an
        epoch's end for the epoch (whose interval goes on into the next one)."""
        args, soft = self.args, bool(self.args.teacher or self.args.teacher_logits)
        steps, ce, kd, written_kd = (max(self.step_in_epoch, 1), self.epoch_ce, self.epoch_kd,
                                     self.epoch_written_kd) if epoch_end else \
            (self.interval_steps, self.interval_ce, self.interval_kd, self.rollout.get("kd", 0.0))
        loss = ((1 - args.kd_weight) * ce + args.kd_weight * kd if soft else ce) + written_kd
        tokens_per_sec = self.interval_tokens / max(self.elapsed_s - self.interval_start_s, 1e-9)
        on_policy = rollout_columns(self.rollout)
        row = [self.epoch, self.total_steps, f"{loss / steps:.6f}", f"{val_loss:.6f}", f"{lr:.6g}",
               f"{tokens_per_sec:.0f}", f"{self.elapsed_s:.1f}", f"{ce / steps:.6f}",
               f"{kd / steps:.6f}" if soft else "", *on_policy]
        if self.first:
            with open(self.out / "metrics.csv", "a", newline="") as f:
                csv.writer(f).writerow(row)
        self.csv_rows, self.rollout = self.csv_rows + 1, {}
        if epoch_end:
            return f"[Epoch {self.epoch}/{args.epochs} done] train_loss {loss / steps:.4f} " \
                   f"val_loss {val_loss:.4f}"
        self.interval_ce = self.interval_kd = self.interval_tokens = self.interval_steps = 0
        self.interval_start_s = self.clock()
        eta = (total_steps - self.total_steps) * self.elapsed_s / self.total_steps
        rollouts = (" | rollouts: {} tokens, {} cut, {} boxed, KD/token {} | s/step: rollout {}, teacher {}, "
                    "student {}").format(*on_policy) if args.on_policy else ""
        return (f"[Epoch {self.epoch}/{args.epochs} Step {self.total_steps}/{total_steps}] train_loss "
                f"{loss / steps:.4f} val_loss {val_loss:.4f} | lr {lr:.3g} | {tokens_per_sec:,.0f} tok/s | "
                f"ETA {qwen3.format_seconds(eta)}{rollouts}")

    def end_epoch(self, checkpoint):
        self.epoch, self.step_in_epoch, self.epoch_ce, self.epoch_kd = self.epoch + 1, 0, 0.0, 0.0
        self.epoch_written_kd, self.last_checkpoint = 0.0, str(checkpoint)

    def save(self, path, trained, optimizer, tok, resumable=False, **extra):
        """A checkpoint of the weights, with resumable=True of all that --resume needs too. All processes call
        it (FSDP gathers the shards); the first one writes."""
        weights, optimizer_state = common.gather_state(trained, optimizer if resumable else None)
        if resumable:
            extra.update(optimizer=optimizer_state, position=asdict(self), rng=torch.get_rng_state())
        if self.first:
            qwen3.save_checkpoint(path, getattr(trained, "module", trained), tok, weights=weights,
                                  args=vars(self.args), elapsed_s=self.elapsed_s, **extra)
        return path

    def failed(self, micro_batches):
        """The one line that stops a run at a non-finite loss, before anything is saved."""
        rows = [e["row"] for b in micro_batches for e in b]
        last = f"Last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else \
            "No checkpoint was written: fix the cause and start again."
        return (f"error: non-finite loss at step {self.total_steps + 1} (epoch {self.epoch}), data rows "
                f"{rows}; stopped without saving. {last}")


def checkpoint_name(model_name, step, epoch):
    size = "tiny" if model_name == "tiny" else \
        (re.findall(r"Qwen3-([\d.]+B)", str(model_name)) or ["model"])[0]
    return f"qwen3-{size}-distill-step{step:05d}-epoch{epoch}.pth"


def rollout_columns(sums):
    """The on-policy columns of a CSV row from the sums since the last one: the answers' mean length, the
    shares cut at the cap and with a box, the KD per token of the student's text, and the seconds per step
    in the rollout, the teacher's scoring and the student's forward and backward."""
    if not sums:
        return [""] * 7
    n = max(sums["answers"], 1)
    return [f"{sums['tokens'] / n:.1f}", f"{sums['cut'] / n:.4f}", f"{sums['boxed'] / n:.4f}",
            f"{sums['kd_per_token'] / max(sums['tokens'], 1):.6f}",
            *(f"{sums[k] / sums['steps']:.3f}" for k in ("rollout_s", "teacher_s", "update_s"))]


# -----------------------------------------------------------------------------
# Setting a run up: data, teacher, checks, resume


def load_examples(args, tok, say=print):
    """Tokenized, filtered, split examples, with every count printed; errors before any training work."""
    examples, skipped, num_rows = data.prepare_examples(args.data_path, tok, args.use_think_tokens,
                                                        args.cache_dir, prompts_only=args.on_policy == 1)
    if args.dataset_size:
        examples = [e for e in examples if e["row"] < args.dataset_size]
        num_rows = min(num_rows, args.dataset_size)
    # rows whose problem is an evaluation problem, or a close copy: reported, or dropped with --decontaminate
    overlaps = data.evaluation_overlaps(args.against, args.cache_dir, download=args.decontaminate)
    rows = data.load_distill_data(args.data_path, args.cache_dir) \
        if overlaps is not None or args.only_correct else None  # read once, for both
    if overlaps is None:
        contamination = f"not checked ({args.against} not downloaded yet: evaluate.py downloads it)"
    else:
        found = data.contaminated(rows[:num_rows], overlaps)
        if args.decontaminate:
            usable = len(examples)
            examples = [e for e in examples if e["row"] not in found]
            skipped[f"contaminated ({args.against})"] = usable - len(examples)
        contamination = data.describe_contaminated(found, args.against)
        contamination += ": --decontaminate drops them" if found and not args.decontaminate else ""
    say(f"data: {num_rows} rows, {len(examples)} usable, skipped: {data.describe_skipped(skipped)}; "
        f"contaminated: {contamination}")
    if args.only_correct:
        examples = correct_only(examples, rows, say)
    if not examples:
        raise ValueError(f"no valid rows in {args.data_path} after preprocessing "
                         f"(skipped: {data.describe_skipped(skipped)})")
    examples, counts = data.filter_by_length(examples, args.max_seq_len)
    say(f"length filter <= {args.max_seq_len} tokens: kept {counts['kept']}, removed {counts['removed']}")
    train, val = data.split_examples(examples, args.validation_size, args.seed)
    say(f"split: {len(train)} train, {len(val)} validation")
    return train, val


def correct_only(examples, rows, say=print):
    """The examples whose teacher answer (message_content) is right against gtruth_answer, by the checker."""
    graded = data.grade_teacher_answers(rows, [e["row"] for e in examples])
    right = [e for e in examples if graded.get(e["row"], (None, False))[1]]
    say(f"only correct: kept {len(right)} of {len(examples)}, dropped {len(examples) - len(right)} whose "
        "message_content is wrong against gtruth_answer")
    return right


def check_schedule(args, total_steps):
    if args.warmup_steps > total_steps:
        raise ValueError(f"--warmup_steps {args.warmup_steps} is more than the run's {total_steps} steps")
    if args.min_lr > args.lr:
        raise ValueError(f"--min_lr {args.min_lr} is above --lr {args.lr}")
    if args.kd_loss == "jsd" and not 0 < args.jsd_beta < 1:
        raise ValueError(f"--jsd_beta must be in (0, 1), got {args.jsd_beta}")


def load_teacher(args, tok, student, train_set, device, compute_dtype):
    """(soft targets, rollouts) of a run with a teacher besides the traces, from teacher.py: a model in memory
    (--teacher) or a file of its top-k log-probabilities (--teacher_logits); with --on_policy the rollouts
    of the student it scores. (None, None) without one."""
    kd, soft = teacher.KD(args.kd_loss, args.kd_temperature, args.jsd_beta), None
    if args.teacher:
        soft = teacher.Teacher(args.teacher, tok, student.cfg.vocab_size, kd, device, args.teacher_device,
                               args.cache_dir, timed=args.on_policy > 0)
    elif args.teacher_logits:
        soft = teacher.read_logits(args.teacher_logits, args.data_path, tok, args.use_think_tokens,
                                   args.cache_dir, kd, device)
        soft.check_covers(train_set)
    rollouts = teacher.Rollouts(student, tok, compute_dtype, args.on_policy, args.rollout_temperature,
                                args.rollout_max_new_tokens, args.samples_per_prompt, args.seed,
                                compiled=args.compile) if args.on_policy else None
    return soft, rollouts


def check_on_policy(args):
    if not 0 <= args.on_policy <= 1:
        raise ValueError(f"--on_policy is a share of each step's examples, in [0, 1]; got {args.on_policy}")
    if not args.on_policy:
        return
    if args.teacher_logits:
        raise ValueError("--on_policy needs an online --teacher: a --teacher_logits file holds the teacher's "
                         "scores of its own text only, and cannot score the student's new answers")
    if not args.teacher:
        raise ValueError("--on_policy needs a --teacher to score the student's answers")
    if args.fsdp:
        raise ValueError("--on_policy with --fsdp is not supported: generating token by token, FSDP would "
                         "gather every weight for every token on all processes in lockstep; use DDP (no "
                         "--fsdp)")
    if args.samples_per_prompt < 1 or args.rollout_max_new_tokens < 1:
        raise ValueError("--samples_per_prompt and --rollout_max_new_tokens must be >= 1")


def resume_args(args, argv, world_size, say=print):
    """--resume: the run's own arguments (with the changes allowed) and its resumable state."""
    where = Path(args.resume or args.out_dir)  # --resume alone: the run in --out_dir
    path = where / "last.pth" if where.is_dir() else where
    state = qwen3.read_checkpoint(path, mmap=True)  # every process: read only what it touches
    if "optimizer" not in state:
        raise ValueError(f"{path} holds weights only: resume needs the run's last.pth "
                         "(use --checkpoint_path to start from weights)")
    saved = state["args"]
    if "dtype" in saved:  # a run started before --precision had its name
        saved["precision"] = saved.pop("dtype")
    # flags given now override the saved ones; absent flags keep their saved values
    merged = parse_args(argv, namespace=argparse.Namespace(**saved))
    changed = [f"--{k} {saved[k]} -> {getattr(merged, k)}" for k in saved
               if k not in RESUME_MAY_CHANGE and getattr(merged, k) != saved[k]]
    if changed:
        raise ValueError(f"--resume continues a run as it was started; these flags would change it: "
                         f"{', '.join(changed)} (start a new run with --checkpoint_path {path} instead)")
    merged.out_dir, merged.resume = str(path.parent), str(path)
    old_world = state["position"]["world_size"]
    if old_world != world_size:  # keep the examples per optimizer step, so the run stays the same
        if merged.grad_accum * old_world % world_size:
            raise ValueError(f"the run used {old_world} processes x --grad_accum {merged.grad_accum}; on "
                             f"{world_size} processes no --grad_accum gives the same global batch: resume on "
                             f"{old_world} processes")
        merged.grad_accum = merged.grad_accum * old_world // world_size
        say(f"resuming on {world_size} processes instead of {old_world}: --grad_accum {merged.grad_accum} "
            "per process keeps the examples of every optimizer step as they were")
    if merged.epochs != saved["epochs"] and merged.lr_schedule != "constant":
        say(f"note: the {merged.lr_schedule} schedule now spans {merged.epochs} epochs instead of "
            f"{saved['epochs']}: from here on the learning rate follows the longer curve (it rises again)")
    return merged, state


def check_out_dir(out):
    """A new run may use a directory that holds no checkpoint (a run that failed before its first one)."""
    if (out / "last.pth").exists():
        raise ValueError(f"{out} already holds a run: continue it with --resume {out}, "
                         "or choose another --out_dir")
    if list(out.glob("*.pth")):
        raise ValueError(f"{out} holds checkpoints: choose another --out_dir")


@contextmanager
def deferred_signals():
    """Ctrl-C (SIGINT) and SIGTERM only raise a flag, checked after each step so that a resumable checkpoint
    can be written; a second Ctrl-C stops at once. The previous handlers come back afterwards."""
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


if __name__ == "__main__":
    common.run(main)
