"""
Qwen3 in one file: config, model, KV-cache generation, tokenizer, weights and checkpoints, downloads.
It needs torch, tokenizers and safetensors (requests to download), and nothing else of this project.

Numerics follow the official Hugging Face implementation: RMSNorm in float32 then cast back,
per-head q/k RMSNorm before RoPE, split-halves RoPE computed in float32, SwiGLU MLP.

    model = load_model("Qwen/Qwen3-0.6B-Base")
    tok = load_tokenizer("Qwen/Qwen3-0.6B-Base", kind="base")
    ids = generate(model, [tok.encode("1+1=")], max_new_tokens=8, eos_id=tok.eos_token_id)

    python qwen3.py generate "What is 2+3?" --checkpoint_path runs/r1     # stream an answer
    python qwen3.py export runs/r1 runs/r1-hf                              # Hugging Face layout
"""
import argparse
import collections
import hashlib
import json
import os
import random
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config


@dataclass
class Qwen3Config:
    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 40960
    attention_bias: bool = False

    @classmethod
    def from_hf(cls, hf: dict):
        """Build from a Hugging Face config.json dict (any dense Qwen3 size); absent keys take the
        defaults of transformers' Qwen3Config, so both read a file the same way."""
        if hf.get("model_type", "qwen3") != "qwen3":
            raise ValueError(f"expected a dense Qwen3 config, got model_type={hf.get('model_type')!r}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} (Qwen3 uses silu)")
        rope = hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"unsupported rope_scaling {rope}")
        if hf.get("use_sliding_window"):
            raise ValueError("sliding-window attention (use_sliding_window) is not supported")
        # newer transformers versions nest rope_theta under rope_parameters
        rope_theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads", 32) or hf["num_attention_heads"],
            head_dim=hf.get("head_dim", 128),
            rope_theta=float(rope_theta),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            attention_bias=hf.get("attention_bias", False),
        )

    def to_hf(self) -> dict:
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
                "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151643, **asdict(self)}


# A few layers of small width, random init: CPU tests and the offline walkthrough.
# head_dim != hidden/heads and GQA on purpose, like the real 0.6B model.
TINY = Qwen3Config(vocab_size=320, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=48, rope_theta=10000.0,
                   tie_word_embeddings=True, max_position_embeddings=4096)
# random init, no download: tests, the walkthrough, benchmarks of the real shapes (Qwen3 0.6B to 8B)
RANDOM_CONFIGS = {
    "tiny": TINY, "random-0.6B": Qwen3Config(),
    "random-1.7B": Qwen3Config(hidden_size=2048, intermediate_size=6144),
    "random-4B": Qwen3Config(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                             num_attention_heads=32),
    "random-8B": Qwen3Config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                             num_attention_heads=32, tie_word_embeddings=False),
}

# -----------------------------------------------------------------------------
# Model


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # float32 statistics, then cast back before the weight, as in the official code
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """cos/sin tables for integer positions [B, T] -> [B, 1, T, head_dim], computed in float32 (bfloat16 keeps
    8 significant bits: at position 2,000 an angle would be off by up to 4 radians)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    freqs = positions.float()[..., None] * (1.0 / theta ** exponents)
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Preallocated keys/values, one [batch, kv_heads, max_len, head_dim] pair per layer. Before each
    forward the caller says where its tokens go (`locate`); every layer then writes there and reads the
    filled prefix."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        self.group = cfg.num_attention_heads // cfg.num_key_value_heads
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]

    def locate(self, positions, filled):
        """positions [B, T]: where each row's tokens go; filled: how many positions the fullest row then holds
        (its last position + 1), which the caller knows without asking the device. Key j is visible to the
        query at position p iff j <= p.
        Rows decode at different lengths, so each needs its own mask, computed here once for all layers; it
        has one row per folded query (see Attention): row g * T + t sees what token t sees."""
        self.positions, self.filled = positions, filled
        visible = torch.arange(filled, device=positions.device) <= positions[:, None, :, None]
        self.mask = visible.repeat(1, 1, self.group, 1)

    def update(self, layer, k, v):
        """Write k/v [B, H, T, D] at this forward's positions; return the filled prefix."""
        # a scatter, not a slice: the rows of a batch are at different positions
        index = self.positions[:, None, :, None].expand_as(k)
        self.k[layer].scatter_(2, index, k)
        self.v[layer].scatter_(2, index, v)
        return self.k[layer][:, :, :self.filled], self.v[layer][:, :, :self.filled]

    def keep(self, slots):
        """Drop finished rows so that they cost no more compute."""
        self.k = [t[slots] for t in self.k]
        self.v = [t[slots] for t in self.v]

    def put(self, slots, other, rows):
        """Copy rows of another cache (prefilled prompts) into these slots, from position 0."""
        n = other.k[0].shape[2]
        for mine, theirs in zip(self.k + self.v, other.k + other.v):
            mine[slots, :, :n] = theirs[rows]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, layer, cache=None):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:  # training / full forward: plain causal attention (flash kernels)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # each row attends to its own filled cache prefix, under the cache's mask
            k, v = cache.update(layer, k, v)
            # SDPA with a mask and enable_gqa falls back to the math kernel, which copies the cached keys and
            # values for every query head. Instead the query heads that share a key/value head are folded into
            # one longer query ([B, n_kv, group * T, D]): same result, no copy, fused kernels take the mask.
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, -1, self.head_dim), k, v,
                                               attn_mask=cache.mask)
            # reshape, not view: CUDA's memory-efficient kernel returns a transposed [B, T, heads, D] buffer
            y = y.reshape(B, self.n_head, T, self.head_dim)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, layer, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:  # the small Qwen3 models read and write tokens with one matrix
            self.lm_head.weight = self.embed_tokens.weight
        self.grad_checkpointing = False
        for module in self.modules():  # the official init: N(0, 0.02), norms at one, biases at zero
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def hidden_states(self, input_ids, cache=None):
        """Final-norm hidden states [B, T, hidden]. With a cache, the tokens go where it was told (locate)."""
        if cache is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        else:
            positions = cache.positions
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for i, block in enumerate(self.layers):
            if self.grad_checkpointing and self.training:  # keep only each block's input; redo it in backward
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, i, use_reentrant=False)
            else:
                x = block(x, cos, sin, i, cache)
        return self.norm(x)

    def forward(self, input_ids, cache=None, loss_fn=None):
        """Logits [B, T, vocab]; or loss_fn(hidden states, LM head weight), e.g. the training loss that never
        builds the full logits. It runs inside forward so that DDP and FSDP wrappers see the whole step."""
        hidden = self.hidden_states(input_ids, cache)
        return self.lm_head(hidden) if loss_fn is None else loss_fn(hidden, self.lm_head.weight)

    def compile_blocks(self):
        """torch.compile each block once for all sequence lengths (dynamic shapes: no recompiling)."""
        for block in self.layers:
            block.compile(dynamic=True)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # parameters() counts a tied head once

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 x matmul parameters (head included) plus causal attention."""
        cfg = self.cfg
        # the embedding is a lookup, the head a matmul: with tied weights num_params counts the pair once
        matmul_params = self.num_params() - cfg.vocab_size * cfg.hidden_size * (not cfg.tie_word_embeddings)
        attention = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len  # 12LHDT/2
        return 6 * matmul_params + attention


# -----------------------------------------------------------------------------
# Generation. generate_simple is the plain version to read first; generate_stream is the fast one
# used everywhere (many prompts in one batch, sampling, shared prompts, thinking budgets).


@torch.inference_mode()
def generate_simple(model, prompt, max_new_tokens, eos_id=None):
    """Greedy answer to one prompt with a KV cache: prefill the prompt, then feed one token at a time."""
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    cache = KVCache(model.cfg, 1, len(prompt) + max_new_tokens, device, dtype)
    ids, filled, answer = prompt, 0, []
    while len(answer) < max_new_tokens and (not answer or answer[-1] != eos_id):
        cache.locate(torch.arange(filled, filled + len(ids), device=device)[None], filled + len(ids))
        logits = model(torch.tensor([ids], device=device), cache)[:, -1]  # the last position predicts
        filled += len(ids)
        ids = [int(logits.argmax(-1))]
        answer += ids
    return answer


def to_device(values, device, dtype=torch.long):
    """A host list (or CPU tensor) as a tensor on `device`. To a GPU it goes through pinned memory, queued
    behind the kernels already launched instead of waiting for them as a copy from pageable memory does."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass
class Sampling:
    """Decoding settings. temperature 0 is greedy; otherwise a token is drawn from the tempered distribution
    restricted to the top_k most likely tokens (0: all) and then to the top_p nucleus."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def check(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no limit), got {self.top_k}")
        return self

    def stream(self, key):
        """The random numbers of one answer: its own stream, seeded by (seed, key), so that a sampled answer
        does not depend on the batch size or on which other prompts share the batch."""
        return random.Random(f"{self.seed}/{key}")


# the Qwen3 model card's settings for thinking mode (it advises against greedy decoding there)
THINKING_SAMPLING = dict(temperature=0.6, top_p=0.95, top_k=20)


def pick_tokens(logits, sampling, uniforms):
    """The next token of each row: argmax, or inverse-CDF sampling with one uniform number per row."""
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    probs, order = torch.softmax(logits.float() / sampling.temperature, -1), None
    if sampling.top_k:
        probs, order = probs.topk(min(sampling.top_k, probs.shape[-1]), -1)
    if sampling.top_p < 1:
        if order is None:
            probs, order = probs.sort(-1, descending=True)
        # keep the smallest set of most likely tokens whose mass reaches top_p
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= sampling.top_p, 0.0)
    cdf = probs.double().cumsum(-1)  # float64: a uniform just below 1 must not round up past the last token
    choice = torch.searchsorted(cdf, uniforms[:, None] * cdf[:, -1:], right=True).clamp(max=cdf.shape[-1] - 1)
    return choice.squeeze(-1) if order is None else order.gather(-1, choice).squeeze(-1)


@dataclass
class ThinkingBudget:
    """Budget forcing: an answer with `tokens` tokens and its <think> still open gets close_ids (</think>
    and a blank line) appended, then at most `answer_tokens` more for its final answer."""
    tokens: int
    open_id: int
    close_ids: list
    answer_tokens: int = 512

    def still_thinking(self, thinking, token):
        """Whether the thought is open after `token`, given whether it was open before."""
        return token == self.open_id or (thinking and token != self.close_ids[0])

    def cut_at(self, answer):
        """Where generate_stream closed this (complete) answer's thought by force, or None."""
        thinking = False
        for token in answer[:self.tokens]:
            thinking = self.still_thinking(thinking, token)
        return self.tokens if thinking and len(answer) > self.tokens else None


@torch.inference_mode()
def generate_stream(model, prompts, max_new_tokens, eos_id=None, batch_size=None, sampling=None, keys=None,
                    budget=None):
    """Yield (row, token, done) for each new token of each prompt, as soon as it exists.

    Up to batch_size prompts (default: all) decode together in one preallocated KV cache, one slot each;
    every row keeps its true positions, so results equal running each prompt alone. A row is done at
    eos_id (which is yielded) or after max_new_tokens. Its slot then takes the next waiting prompt
    (continuous batching: the batch stays full), or leaves the batch when none waits. Equal prompts (several
    samples of one problem) are prefilled once. keys name each row's random stream (default: its index).
    A decode step waits for the device once, for its new tokens (eos and budgets need them); what else the
    host needs, as each row's position, it keeps itself.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt")
    if not prompts or max_new_tokens < 1:
        return
    sampling = sampling or Sampling()
    keys = keys or range(len(prompts))
    device = next(model.parameters()).device
    limit = max(max_new_tokens, budget.tokens + len(budget.close_ids) + budget.answer_tokens if budget else 0)
    slots = min(batch_size or len(prompts), len(prompts))
    cache = KVCache(model.cfg, slots, max(map(len, prompts)) + limit, device, model.embed_tokens.weight.dtype)
    # Per slot: the row decoding there (None: free), the position of its next input token, its token count
    # and limit, its random stream, the tokens to force next (a thought closed by the budget), and whether its
    # thought is open. The device holds the next input tokens and their positions.
    columns = rows, where, counts, limits, streams, forced, thinking = tuple([None] * slots for _ in range(7))
    tokens = torch.zeros(slots, dtype=torch.long, device=device)
    positions = torch.zeros(slots, dtype=torch.long, device=device)
    waiting = collections.deque(range(len(prompts)))
    prefilled = _SharedPrefill(model, prompts, device)
    while True:
        free = [s for s, row in enumerate(rows) if row is None]
        if len(free) > len(waiting):  # more free slots than prompts: the surplus leaves the batch (an idle
            # row would still cost its share of every decode step)
            keep = sorted([s for s, row in enumerate(rows) if row is not None] + free[:len(waiting)])
            if not keep:
                return
            columns = rows, where, counts, limits, streams, forced, thinking = tuple(
                [column[s] for s in keep] for column in columns)
            keep = to_device(keep, device)
            tokens, positions = tokens[keep], positions[keep]
            cache.keep(keep)
            free = [s for s, row in enumerate(rows) if row is None]
        if free:  # admit: the cache gets all but the last prompt token, which the decode step below feeds,
            # so that a new row joins the shared step at once
            new = [waiting.popleft() for _ in free]
            prefilled.put(cache, free, new)
            for s, i in zip(free, new):
                rows[s], where[s], counts[s], limits[s] = i, len(prompts[i]) - 1, 0, max_new_tokens
                streams[s], forced[s], thinking[s] = sampling.stream(keys[i]), [], False
            free_t = to_device(free, device)
            tokens[free_t] = to_device([prompts[i][-1] for i in new], device)
            positions[free_t] = to_device([where[s] for s in free], device)
        cache.locate(positions[:, None], max(where) + 1)
        logits = model(tokens[:, None], cache)[:, -1]
        uniforms = to_device([stream.random() for stream in streams], device, torch.float64) \
            if sampling.temperature > 0 else None
        tokens = pick_tokens(logits, sampling, uniforms)  # the next step's inputs
        for s, token in enumerate(tokens.tolist()):  # the one wait for the device in a step
            if forced[s]:  # the budget closes this thought: the forced tokens replace the model's choice
                tokens[s] = token = forced[s].pop(0)
            counts[s] += 1
            if budget:
                thinking[s] = budget.still_thinking(thinking[s], token)
                if thinking[s] and counts[s] == budget.tokens:
                    forced[s] = list(budget.close_ids)
                    limits[s] = budget.tokens + len(budget.close_ids) + budget.answer_tokens
            done = token == eos_id or counts[s] == limits[s]
            yield rows[s], token, done
            if done:
                rows[s] = None
        positions += 1
        where[:] = [w + 1 for w in where]


class _SharedPrefill:
    """Prefills prompts into cache slots, each distinct prompt once: its keys/values are kept while other rows
    with the same prompt (more samples of the problem) still wait, and copied into their slots."""

    def __init__(self, model, prompts, device):
        self.model, self.prompts, self.device = model, prompts, device
        self.waiting = collections.Counter(tuple(p) for p in prompts)  # rows per prompt not yet admitted
        self.kept = {}  # distinct prompt -> (cache holding its keys/values, row in that cache)

    def put(self, cache, slots, rows):
        todo = list(dict.fromkeys(tuple(self.prompts[i]) for i in rows
                                  if len(self.prompts[i]) > 1 and tuple(self.prompts[i]) not in self.kept))
        if todo:  # one right-padded forward for the new prompts: the causal mask makes padding harmless
            width = max(map(len, todo)) - 1
            part = KVCache(self.model.cfg, len(todo), width, self.device, cache.k[0].dtype)
            ids = torch.zeros(len(todo), width, dtype=torch.long)
            for r, p in enumerate(todo):
                ids[r, :len(p) - 1] = torch.tensor(p[:-1])
            part.locate(torch.arange(width, device=self.device).expand(len(todo), -1), width)
            self.model.hidden_states(to_device(ids, self.device), part)
            self.kept.update({p: (part, r) for r, p in enumerate(todo)})
        for slot, i in zip(slots, rows):
            prompt = tuple(self.prompts[i])
            if len(prompt) > 1:
                part, r = self.kept[prompt]
                cache.put([slot], part, [r])
            self.waiting[prompt] -= 1
            if not self.waiting[prompt]:
                self.kept.pop(prompt, None)  # its last row is in: free the memory


def generate(model, prompts, max_new_tokens, eos_id=None, batch_size=None, **options):
    """Token ids generated for each prompt (eos included when reached)."""
    out = [[] for _ in prompts]
    for row, token, _ in generate_stream(model, prompts, max_new_tokens, eos_id, batch_size, **options):
        out[row].append(token)
    return out


# -----------------------------------------------------------------------------
# Tokenizer


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


class Tokenizer:
    """The official tokenizer.json through `tokenizers`, in one of two variants.

    base: no chat template, eos <|endoftext|>.
    reasoning: prompts wrapped as <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n,
    eos <|im_end|>.
    """

    def __init__(self, tokenizer_json: str, kind="base"):
        # imported here, as requests and safetensors below: `import qwen3` stays light for what needs none
        from tokenizers import Tokenizer as HFTokenizer
        if kind not in ("base", "reasoning"):
            raise ValueError(f"tokenizer kind must be 'base' or 'reasoning', not {kind!r}")
        self.json, self.kind = tokenizer_json, kind
        self.tok = HFTokenizer.from_str(tokenizer_json)
        missing = [t for t in SPECIAL_TOKENS if self.tok.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the Qwen3 special tokens {missing}")
        self.eos_token = "<|im_end|>" if kind == "reasoning" else "<|endoftext|>"
        self.eos_token_id = self.tok.token_to_id(self.eos_token)
        self.sha256 = hashlib.sha256(tokenizer_json.encode()).hexdigest()

    def wrap(self, prompt):
        if self.kind == "base":
            return prompt
        return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"

    def encode(self, text, chat_wrapped=None):
        """Token ids; chat_wrapped defaults to True for the reasoning variant (prompts): False for targets."""
        if chat_wrapped is None:
            chat_wrapped = self.kind == "reasoning"
        return self.tok.encode(self.wrap(text) if chat_wrapped else text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        """Unwrapped ids for many texts at once, on all CPU cores (without offsets: twice as fast)."""
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def vocabulary(self):
        """Every token string and its id, special tokens included: two tokenizers agree iff these do."""
        return self.tok.get_vocab(with_added_tokens=True)


# The tiny tokenizer's merges are learned from this one example of the walkthrough's text (data.py's
# prompt template, a sum, its trace and answer). In bytes its sequences were 203 tokens, three quarters of
# them the prompt; with the merges that fill the tiny vocabulary they are 92, and the CPU walkthrough
# trains twice as fast.
TINY_TOKENIZER_TEXT = ("You are a helpful math assistant.\nAnswer the question and write the final result on "
                       "a new line as:\n\\boxed{ANSWER}\n\nQuestion:\nWhat is 2 + 7 + 9?\n\nAnswer: "
                       "2 + 7 + 9\n= 9 + 9\n= 18\n\nThe sum is 18.\n\n\\boxed{18}")


def tiny_tokenizer_json():
    """A small BPE tokenizer built in code: the 256 bytes, the Qwen3 special-token strings, and merges
    learned from TINY_TOKENIZER_TEXT up to the tiny model's vocabulary. Digits stay single tokens: a sum
    sees each one."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY.vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TINY_TOKENIZER_TEXT], trainer)
    return tok.to_str()


def load_tokenizer(name_or_path, kind="base", cache_dir=None):
    """Tokenizer from a repo id, a local model directory, a tokenizer.json file, or 'tiny' / 'random-0.6B'."""
    if name_or_path in RANDOM_CONFIGS:  # the random models use the tiny tokenizer
        return Tokenizer(tiny_tokenizer_json(), kind)
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path.parent}: copy the official one there")
    elif not path.is_file():  # a Hub repo id: fetch tokenizer.json alone, not the weights
        path = _hub_files(str(name_or_path), ["tokenizer.json"], cache_dir)[0]
    return Tokenizer(path.read_text(encoding="utf-8"), kind)


# -----------------------------------------------------------------------------
# Weights and checkpoints. Three ways in: load_model (a random config, a Hugging Face-layout directory or
# Hub repo id), load_checkpoint (this project's files: weights, config and tokenizer in one), and load,
# which takes either and returns the model with its tokenizer.

HF_URL = "https://huggingface.co/{repo}/resolve/main/{file}"
CHECKPOINT_FORMAT = "qwen3-distill-v1"


def load_model(name, device="cpu", dtype=torch.float32, cache_dir=None, seed=0):
    """'tiny' or 'random-0.6B' (random init, seeded), a Hub repo id or a local Hugging Face directory."""
    if name in RANDOM_CONFIGS:
        torch.manual_seed(seed)
        with torch.device(device):
            return Qwen3(RANDOM_CONFIGS[name]).to(dtype=dtype).eval()
    from safetensors.torch import load_file
    d = _model_dir(name, cache_dir)
    cfg = Qwen3Config.from_hf(json.loads((d / "config.json").read_text()))
    tensors = {}
    for f in _weight_files(d):
        tensors.update(load_file(d / f))
    model = empty_model(cfg, device, dtype)
    own = {_hf_name(k): v for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:  # one tensor under two names; some tied checkpoints store the copy too
        own.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"{d}: missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for name, t in tensors.items():
        if t.shape != own[name].shape:
            raise ValueError(f"{d}: tensor {name} has shape {tuple(t.shape)}, the config needs "
                             f"{tuple(own[name].shape)}")
    with torch.no_grad():
        for name, t in tensors.items():
            own[name].copy_(t)
    return model.eval()


def load_checkpoint(path, device="cpu", dtype=torch.float32):
    """(model, tokenizer, checkpoint dict) rebuilt from a checkpoint alone."""
    state = read_checkpoint(path, device)
    model = empty_model(_checkpoint_config(state), device, dtype)
    load_weights(model, state, path)
    tokenizer = Tokenizer(state["tokenizer"]["json"], state["tokenizer"]["kind"])
    return model.eval(), tokenizer, state


def load(source, which_model="base", device="cpu", dtype=torch.float32, cache_dir=None):
    """(model, tokenizer) from a checkpoint of this project (a .pth file, or a run directory for its latest
    epoch), which carries its own tokenizer variant; or else from a model name, with `which_model`."""
    source = str(source)
    if source.endswith(".pth") or list(Path(source).glob("*-step*-epoch*.pth")):
        return load_checkpoint(source, device, dtype)[:2]
    return load_model(source, device, dtype, cache_dir), load_tokenizer(source, which_model, cache_dir)


def save_checkpoint(path, model, tokenizer, weights=None, **extra):
    """Saved whole or not at all (save_atomically). weights: the model's state dict unless given
    (gathered from shards); they keep the dtype they train in (float32 master weights: what an exact resume
    needs). extra: optimizer state, step, RNG states... (plain data only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = model.state_dict() if weights is None else weights
    state = {"format": CHECKPOINT_FORMAT, "config": asdict(model.cfg), "model": weights,
             "tokenizer": {"json": tokenizer.json, "kind": tokenizer.kind}, **extra}
    return save_atomically(path, lambda tmp: torch.save(state, tmp))


def save_atomically(path, save):
    """Write a file whole or not at all: save(a temporary path of this process's), then a rename. A kill while
    writing leaves the old file as it was; two processes writing one file at once do not mix."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save(tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path, device="cpu", mmap=False):
    """The checkpoint dict, never unpickling anything but tensors and plain data (weights_only=True).
    A run directory stands for its latest epoch checkpoint. mmap: tensors are read only when touched."""
    if Path(path).is_dir():
        epochs = sorted(Path(path).glob("*-step*-epoch*.pth"),
                        key=lambda p: int(re.search(r"-step(\d+)-", p.name).group(1)))
        if not epochs:
            raise FileNotFoundError(f"no epoch checkpoint (*-step*-epoch*.pth) in {path}")
        path = epochs[-1]
    try:
        state = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a checkpoint written by this project (a bare state dict? "
                         "use --model to give the architecture and load it with --checkpoint_path in "
                         "train.py)")
    return state


def load_weights(model, state, path):
    """Load a checkpoint's weights into a model of the same config, or say why not in one line."""
    theirs = _checkpoint_config(state)
    if theirs != model.cfg:
        diff = {k: (v, getattr(model.cfg, k)) for k, v in asdict(theirs).items()
                if getattr(model.cfg, k) != v}
        raise ValueError(f"{path}: checkpoint is for a different model config (checkpoint vs model: {diff})")
    with torch.no_grad():
        model.load_state_dict(state["model"])


def export_hf(model, tokenizer, out_dir):
    """Write config.json, model.safetensors and tokenizer.json for transformers, vLLM and load_model."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {_hf_name(k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(model.cfg.to_hf(), indent=2))
    (out / "tokenizer.json").write_text(tokenizer.json, encoding="utf-8")
    eos = {"eos_token": tokenizer.eos_token, "pad_token": "<|endoftext|>"}
    tokenizer_config = {"tokenizer_class": "Qwen2TokenizerFast", **eos}
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return out


def _hf_name(name):
    return name if name == "lm_head.weight" else "model." + name


def empty_model(cfg, device, dtype):
    """A model with uninitialised weights (no slow random init for weights about to be overwritten)."""
    with torch.device("meta"):
        model = Qwen3(cfg)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # to_empty unties
    return model


def _checkpoint_config(state):
    known = {f.name for f in fields(Qwen3Config)}
    return Qwen3Config(**{k: v for k, v in state["config"].items() if k in known})


def _weight_files(d):
    """The safetensors files of a model directory: one file, or the shards its index lists."""
    if (d / "model.safetensors").exists():
        return ["model.safetensors"]
    return sorted(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values()))


def _complete(d: Path):
    """Config and every weight file present (the tokenizer is loaded, and fetched, on its own)."""
    index = d / "model.safetensors.index.json"
    return (d / "config.json").exists() and ((d / "model.safetensors").exists() or (
        index.exists() and all((d / f).exists() for f in _weight_files(d))))


def _hub_files(repo, files, cache_dir=None):
    """Local paths of files from a Hub repo, downloaded once into the cache (later runs make no request)."""
    if repo.count("/") != 1:
        raise FileNotFoundError(f"{repo!r} is neither a local path nor a Hugging Face repo id "
                                "like 'Qwen/Qwen3-0.6B-Base'")
    d = Path(cache_dir or default_cache_dir()) / "models" / repo.replace("/", "--")
    try:
        return [d / f if (d / f).exists() else download(HF_URL.format(repo=repo, file=f), d / f)
                for f in files]
    except DownloadError as e:  # the first line keeps the cause (e.g. "HTTP 404", read by the shard probe)
        raise DownloadError(f"{e}\nCould not fetch {repo} from the Hugging Face Hub. On a machine with "
                            f"internet, download config.json, tokenizer.json and model*.safetensors from "
                            f"https://huggingface.co/{repo} into {d} (or any directory, and pass that "
                            "directory instead of the repo id).") from None


def _model_dir(name_or_dir, cache_dir=None):
    """A local model directory for a path or a Hub repo id, downloading what is missing (once)."""
    if Path(name_or_dir).is_dir():
        d = Path(name_or_dir)
        if not _complete(d):
            raise FileNotFoundError(f"{d} is not a Hugging Face model directory: it needs config.json and "
                                    "model.safetensors (or model.safetensors.index.json with its shards)")
        return d
    repo = str(name_or_dir)
    d = _hub_files(repo, ["config.json", "tokenizer.json"], cache_dir)[0].parent
    if not _complete(d):
        try:  # sharded checkpoints have an index; single-file ones answer 404
            _hub_files(repo, ["model.safetensors.index.json"], cache_dir)
        except DownloadError as e:
            if "HTTP 404" not in str(e):
                raise
            _hub_files(repo, ["model.safetensors"], cache_dir)
        else:
            _hub_files(repo, _weight_files(d), cache_dir)
    return d


# -----------------------------------------------------------------------------
# Devices


def pick_device(name="auto"):
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def pick_dtype(name, device):
    """Inference dtype. 'auto': bfloat16 on CUDA (its tensor cores), float32 elsewhere (most CPUs compute
    bfloat16 slowly). float32 means true float32 matmuls (TF32 stays off: exact, slow on GPUs)."""
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


# -----------------------------------------------------------------------------
# Downloads (one process at a time per directory, retries, resume of partial files, a size check), and the
# progress bar that the scripts share


def default_cache_dir():
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "reasoning-distill"))


class DownloadError(RuntimeError):
    pass


class Progress:
    """A minimal progress bar on stderr: done/total, rate and ETA. Redrawn in place five times a second
    on a terminal; one line every 30 s when stderr is a file or a pipe. quiet: draws nothing."""

    def __init__(self, total=None, desc="", unit="it", scale=1, quiet=False):
        self.total, self.desc, self.unit, self.scale, self.quiet = total, desc, unit, scale, quiet
        self.done, self.start, self.last, self.status = 0, time.time(), time.time(), None
        self.tty = sys.stderr.isatty()

    def update(self, n=1, status=None):
        """n more done; status: a short text shown after the rate (e.g. live accuracy)."""
        self.done += n
        self.status = status if status is not None else self.status
        now = time.time()
        due = now - self.last > (0.2 if self.tty else 30) or (self.tty and self.done == self.total)
        if self.quiet or not due:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        of = f"/{self.total / self.scale:.0f}" if self.total else ""
        eta = f" ETA {format_seconds((self.total - self.done) / rate)}" if self.total and rate else ""
        line = (f"{self.desc} {self.done / self.scale:.0f}{of} {self.unit} "
                f"({rate / self.scale:.1f} {self.unit}/s){eta}")
        line += f" | {self.status}" if self.status else ""
        sys.stderr.write(f"\r{line}   " if self.tty else line + "\n")
        sys.stderr.flush()

    def write(self, message):
        """Print a line above the bar."""
        if self.quiet:
            return
        if self.tty:
            sys.stderr.write("\r\033[K")
        print(message, flush=True)

    def close(self):
        if self.tty and not self.quiet:
            sys.stderr.write("\n")


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def download(url, dest, retries=4, session=None, chunk=1 << 16):
    """Download url to dest. Partial data lives in dest.part and is resumed with a Range request;
    the file is renamed into place only once its size matches the server's Content-Length. One process at a
    time downloads into a directory: torchrun's processes, or two jobs sharing a cache, fetch a file once, and
    the others find it in place."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _one_process_at_a_time(dest.parent):
        return dest if dest.exists() else _download(url, dest, retries, session, chunk)


@contextmanager
def _one_process_at_a_time(directory):
    """An exclusive lock on a directory (flock: the kernel releases it if its process dies)."""
    try:
        import fcntl  # Unix; elsewhere downloads go unlocked
    except ImportError:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process downloading into {directory}", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _download(url, dest, retries, session, chunk):
    import requests
    session = session or requests.Session()
    part = dest.with_name(dest.name + ".part")
    last_error = None
    for attempt in range(retries):
        have = part.stat().st_size if part.exists() else 0
        try:
            headers = {"Range": f"bytes={have}-"} if have else {}
            with session.get(url, headers=headers, stream=True, timeout=30) as r:
                if r.status_code == 416:  # asked past the end: the partial file is already complete or wrong
                    part.unlink()
                    continue
                if r.status_code in (401, 403, 404):
                    raise DownloadError(f"{url}: HTTP {r.status_code}")
                r.raise_for_status()
                if r.status_code == 200:  # server ignored the Range header: start over
                    have = 0
                length = r.headers.get("Content-Length")
                expected = have + int(length) if length is not None else None
                bar = Progress(expected, f"{dest.name}", unit="MB", scale=1 << 20)
                bar.update(have)
                with open(part, "ab" if have else "wb") as f:
                    for block in r.iter_content(chunk):
                        bar.update(f.write(block))
                bar.close()
            size = part.stat().st_size
            if expected is not None and size != expected:
                raise DownloadError(f"{url}: got {size} bytes, server announced {expected}")
            os.replace(part, dest)
            return dest
        except DownloadError:
            raise
        except Exception as e:  # connection errors, timeouts, 5xx: retry with backoff, keep the partial file
            last_error = e
            if attempt + 1 < retries:
                time.sleep(min(2 ** attempt, 10))
    raise DownloadError(f"could not download {url} after {retries} tries: "
                        f"{type(last_error).__name__}: {last_error}")


# -----------------------------------------------------------------------------
# This file's own commands: talk to a model or checkpoint, export a checkpoint to the Hugging Face layout


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="stream an answer to one prompt")
    g.add_argument("prompt")
    g.add_argument("--model", default="Qwen/Qwen3-0.6B-Base",
                   help="Hub repo id, Hugging Face-layout directory, or 'tiny' / 'random-0.6B'")
    g.add_argument("--which_model", default="base", choices=["base", "reasoning"],
                   help="tokenizer variant: 'reasoning' chat-wraps the prompt and ends at <|im_end|>")
    g.add_argument("--checkpoint_path", default=None, help="a checkpoint of train.py instead (a .pth file or "
                   "a run directory): it carries its model and tokenizer")
    g.add_argument("--device", default="auto", help="auto = cuda, then mps, then cpu")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="auto = bfloat16 on cuda, float32 elsewhere")
    g.add_argument("--cache_dir", default=None, help="downloads (default $DISTILL_CACHE or "
                   "~/.cache/reasoning-distill)")
    g.add_argument("--max_new_tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top_p", type=float, default=1.0)
    g.add_argument("--top_k", type=int, default=0, help="0 = no limit")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    e = sub.add_parser("export", help="write a checkpoint in the Hugging Face layout")
    e.add_argument("checkpoint_path")
    e.add_argument("out_dir")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.cmd == "export":
        model, tok, _ = load_checkpoint(args.checkpoint_path)
        print(f"wrote {export_hf(model, tok, args.out_dir)}")
        return
    device = pick_device(args.device)
    model, tok = load(args.checkpoint_path or args.model, args.which_model, device,
                      pick_dtype(args.dtype, device), args.cache_dir)
    sampling = Sampling(args.temperature, args.top_p, args.top_k, args.seed).check()
    answer, shown = [], ""
    stream = generate_stream(model, [tok.encode(args.prompt)], args.max_new_tokens, tok.eos_token_id,
                             sampling=sampling)
    for _, token, _ in stream:
        if token != tok.eos_token_id:  # decode the whole answer so far: one token may hold half a character
            answer.append(token)
            text = tok.decode(answer)
            print(text[len(shown):], end="", flush=True)
            shown = text
    print()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, DownloadError) as err:  # bad input: one line, no traceback
        sys.exit(f"error: {err}")
