"""
What the scripts share besides the model: their command lines, and their processes under torchrun (set-up,
sums over processes, DDP or FSDP, the end). qwen3.py, the model file, needs none of it.
"""
import argparse
import gc
import os
import sys
from contextlib import nullcontext

import torch

import qwen3

# -----------------------------------------------------------------------------
# Command lines: every script's modes are subcommands, its main job needs none, and bad input ends it with
# one line


def parser(doc, default=None, **subcommands):
    """An argument parser showing defaults; with subcommands {name: help}: (parser, {name: subparser}).
    default: what a command line without a subcommand means (see with_command)."""
    kind = argparse.ArgumentDefaultsHelpFormatter
    description = doc.strip().splitlines()[0] + (f" Without a command: {default}." if default else "")
    p = argparse.ArgumentParser(description=description, formatter_class=kind)
    if not subcommands:
        return p
    sub = p.add_subparsers(dest="cmd", required=True)
    return p, {name: sub.add_parser(name, help=h, description=h, formatter_class=kind)
               for name, h in subcommands.items()}


def with_command(argv, commands, pick):
    """argv with a subcommand first, where it has none: a script's main job needs no subcommand, as before
    the subcommands came (`python evaluate.py --checkpoint_path runs/r1` is `evaluate.py generate ...`).
    pick(argv): the command a line without one means."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]) or (argv and argv[0] in commands):
        return argv
    return [pick(argv), *argv]


def run(main):
    """Every script's entry point: expected errors (bad input, missing files, failed downloads) end the
    program with one line, not a traceback. Under torchrun the processes then end together."""
    try:
        main()
    except (ValueError, FileNotFoundError, qwen3.DownloadError) as err:
        sys.exit(f"error: {err}")
    end_processes()


def peak_memory_gib(device):
    """Peak GPU memory allocated on CUDA; elsewhere the process's peak resident memory."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    import resource  # Unix only: imported where it is used
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# -----------------------------------------------------------------------------
# Processes: under torchrun (WORLD_SIZE > 1) one process per GPU, each with its share of the work


def init_processes(device_name="auto", group=True):
    """(rank, world size, device) of this process: under torchrun one GPU per local rank, and with group=True
    the process group that collectives need (NCCL on CUDA, gloo elsewhere: the tests use CPU processes)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = qwen3.pick_device(device_name)
    if world == 1:
        return 0, 1, device
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    import torch.distributed as dist
    if group and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return int(os.environ["RANK"]), world, device


def all_sum(values, device):
    """Element-wise sum over all processes of numbers and 0-dim tensors on `device`, as a list of floats: the
    tensors (a step's losses) are read with one wait for the device, where they are summed in float64."""
    import torch.distributed as dist
    numbers = [0.0 if isinstance(v, torch.Tensor) else v for v in values]
    summed = qwen3.to_device(numbers, device, torch.float64)
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            summed[i] = v
    if dist.is_initialized():
        dist.all_reduce(summed)
    return summed.tolist()


def distribute(model, fsdp, compute_dtype, world_size):
    """The model that training steps go through: itself in one process; under torchrun wrapped for DDP
    (replicas, gradients averaged), or with fsdp sharded (FSDP2: see shard)."""
    if world_size == 1:
        return model
    if fsdp:
        return shard(model, compute_dtype)
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model)


def shard(model, compute_dtype=None):
    """FSDP2 over the process group: each block's weights, gradients and optimizer state split between the
    processes. With a compute dtype (bfloat16 under mixed precision) the shards, float32, are gathered in it
    for compute and gradients are reduced in float32. Unlike autocast, which keeps norms, RoPE and the
    residual stream in float32, the whole forward then runs in bfloat16: close to one GPU's numbers, not
    equal."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype,
                                  reduce_dtype=torch.float32 if compute_dtype else None)
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    return fully_shard(model, mp_policy=policy)


def sharded(model):
    return hasattr(model, "set_requires_gradient_sync")  # what fully_shard gives a module


def gradient_sync(model, enabled):
    """Where DDP and FSDP synchronise gradients: only in a step's last micro-batch."""
    if hasattr(model, "no_sync") and not enabled:  # DDP
        return model.no_sync()
    if sharded(model):
        model.set_requires_gradient_sync(enabled)
    return nullcontext()


def gather_state(model, optimizer=None):
    """The full weights, and the optimizer state when given: under FSDP collected from every process's shards
    (call it on all of them), otherwise the model's own (not its DDP wrapper's, whose names start with
    'module.')."""
    if not sharded(model):
        return getattr(model, "module", model).state_dict(), optimizer and optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            optimizer and get_optimizer_state_dict(model, optimizer, options=options))


def load_optimizer_state(model, optimizer, state):
    """The inverse of gather_state for the optimizer: under FSDP each process keeps its shard of it."""
    if not sharded(model):
        return optimizer.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def end_processes():
    """Leave the process group together (a barrier first: one process may still be working), once what main
    left behind is gone: a DDP wrapper alive when its group goes made gloo abort at exit now and then."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
