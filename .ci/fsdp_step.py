"""FSDP2 on one GPU, for .ci/gpu: a process group of one still runs the sharded code (fully_shard, the
bfloat16 gather for compute, the float32 gradient reduction) and the gathering of a checkpoint. Three
training steps; prints one JSON line.

    torchrun --standalone --nproc_per_node 1 .ci/fsdp_step.py MODEL DEVICE
"""
import json
import sys
from argparse import Namespace
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench  # noqa: E402
import common  # noqa: E402
import qwen3  # noqa: E402
import train  # noqa: E402

model_name, device = sys.argv[1:3]
dist.init_process_group("nccl" if device == "cuda" else "gloo")
precision = train.pick_precision("bfloat16", device, fsdp=True)
model = common.shard(qwen3.load_model(model_name, device, precision[1]).train(), precision[2])
optimizer = train.adamw(model.parameters(), device, 1e-5, 0.01, precision[0])
examples = bench.synthetic_examples(4, 512, model.cfg.vocab_size, seed=0)
losses = []
for batch in (examples[:2], examples[2:], examples[:2]):
    ce, *_ = train.forward_backward(model, [batch], Namespace(per_example_mean=False, kd_weight=0.0), device)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(float(ce))
weights, state = common.gather_state(model, optimizer)
print(json.dumps({"losses": losses, "gathered_tensors": len(weights), "optimizer_state": len(state["state"]),
                  "peak_memory_gib": common.peak_memory_gib(device)}))
dist.destroy_process_group()
