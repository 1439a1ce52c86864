"""
Qwen3 in one file: config, model, tokenizer, weight download, KV-cache generation, checkpoints.

Numerics follow the official Hugging Face implementation: RMSNorm in float32 then cast back,
per-head q/k RMSNorm before RoPE, split-halves RoPE computed in float32, SwiGLU MLP.

    model = from_pretrained("Qwen/Qwen3-0.6B-Base")
    tok = load_tokenizer("Qwen/Qwen3-0.6B-Base", kind="base")
    ids = generate(model, [tok.encode("1+1=")], max_new_tokens=8, eos_id=tok.eos_token_id)
"""
import collections
import hashlib
import json
import os
import re
import sys
import time
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
    """cos/sin tables for integer positions [B, T] -> [B, 1, T, head_dim], computed in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Preallocated keys/values, one [batch, kv_heads, max_len, head_dim] pair per layer. Each forward first
    calls `locate` with its tokens' positions; every layer then writes there and reads the filled prefix."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        self.group = cfg.num_attention_heads // cfg.num_key_value_heads
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]

    def locate(self, positions):
        """positions [B, T]: where each row's tokens go. Key j is visible to the query at position p iff j <= p;
        the mask has one row per folded query (see Attention): row g * T + t sees what token t sees."""
        self.positions = positions
        self.filled = int(positions.max()) + 1  # attend to this prefix (one host sync per forward, not per layer)
        visible = torch.arange(self.filled, device=positions.device) <= positions[:, None, :, None]
        self.mask = visible.repeat(1, 1, self.group, 1)

    def update(self, layer, k, v):
        """Write k/v [B, H, T, D] at this forward's positions; return the filled prefix."""
        index = self.positions[:, None, :, None].expand_as(k)
        self.k[layer].scatter_(2, index, k)
        self.v[layer].scatter_(2, index, v)
        return self.k[layer][:, :, :self.filled], self.v[layer][:, :, :self.filled]

    def keep(self, slots):
        """Drop finished rows so that they cost no more compute."""
        self.k = [t[slots] for t in self.k]
        self.v = [t[slots] for t in self.v]

    def put(self, slots, other):
        """Copy another cache's rows (new prompts' keys/values) into these slots, from position 0."""
        n = other.k[0].shape[2]
        for mine, theirs in zip(self.k + self.v, other.k + other.v):
            mine[slots, :, :n] = theirs


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
            # the query heads that share a key/value head become one longer query: SDPA with a mask and
            # enable_gqa falls back to the math kernel, which repeats the cached keys/values for every head
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, -1, self.head_dim), k, v, attn_mask=cache.mask)
            y = y.view(B, self.n_head, T, self.head_dim)
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
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.grad_checkpointing = False
        for module in self.modules():  # the official init: N(0, 0.02), norms at one, biases at zero
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def hidden_states(self, input_ids, cache=None, positions=None):
        """Final-norm hidden states [B, T, hidden]. With a cache, positions [B, T] say where each token goes."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        if cache is not None:
            cache.locate(positions)
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for i, block in enumerate(self.layers):
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, i, use_reentrant=False)
            else:
                x = block(x, cos, sin, i, cache)
        return self.norm(x)

    def forward(self, input_ids, cache=None, positions=None):
        return self.lm_head(self.hidden_states(input_ids, cache, positions))

    def compile_blocks(self):
        """torch.compile each block, once for all sequence lengths (dynamic shapes: no recompiling per length)."""
        for block in self.layers:
            block.compile(dynamic=True)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # parameters() counts a tied head once

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 x matmul parameters (head included) plus causal attention."""
        cfg = self.cfg
        # the embedding is a lookup, the head a matmul: with tied weights num_params counts the pair once
        matmul_params = self.num_params() - cfg.vocab_size * cfg.hidden_size * (not cfg.tie_word_embeddings)
        attention = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len  # 12*L*H*D*T/2 causal
        return 6 * matmul_params + attention


# -----------------------------------------------------------------------------
# Answer-only cross-entropy, fused with the LM head and computed in chunks of positions
# so that the [tokens, 151936] float32 logits never exist in full (forward or backward).


class ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, chunk_size):
        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, hidden.shape[0], chunk_size):
            logits = (hidden[s:s + chunk_size] @ weight.t()).float()
            nll = torch.logsumexp(logits, -1) - logits.gather(1, targets[s:s + chunk_size, None]).squeeze(1)
            total += (nll * token_weights[s:s + chunk_size]).sum()
        ctx.save_for_backward(hidden, weight, targets, token_weights)
        ctx.chunk_size = chunk_size
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, targets, token_weights = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        for s in range(0, hidden.shape[0], ctx.chunk_size):
            h = hidden[s:s + ctx.chunk_size]
            grad_logits = torch.softmax(h @ weight.t(), -1, dtype=torch.float32)  # d nll / d logits = softmax - onehot
            grad_logits[torch.arange(len(h), device=h.device), targets[s:s + ctx.chunk_size]] -= 1
            grad_logits = grad_logits.mul_(token_weights[s:s + ctx.chunk_size, None] * grad_total).to(weight.dtype)
            grad_hidden[s:s + ctx.chunk_size] = grad_logits @ weight
            # matmuls in the weights' dtype (bfloat16 tensor cores, not float32 ones), summed over chunks in float32
            grad_weight += grad_logits.t() @ h
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None


def answer_loss(model, input_ids, targets, loss_mask, per_example_mean=False, normalizer=None, chunk_size=512):
    """Cross-entropy over the answer tokens only (loss_mask True), accumulated in float32.

    Default: sum of token losses / normalizer, the number of answer tokens (of this batch unless given:
    pass the optimizer step's total under gradient accumulation). per_example_mean: each example's own
    mean, summed / normalizer examples; at batch size 1 both equal the reference per-example loss.
    """
    hidden = model.hidden_states(input_ids)
    mask = loss_mask.bool()
    counts = mask.sum(1, keepdim=True).float()
    if per_example_mean:
        token_weights = 1.0 / (counts * (normalizer or mask.shape[0]))
    else:
        token_weights = torch.full_like(counts, 1.0 / (normalizer or counts.sum()))
    return ChunkedCrossEntropy.apply(hidden[mask], model.lm_head.weight, targets[mask],
                                     token_weights.expand_as(mask)[mask].contiguous(), chunk_size)


# -----------------------------------------------------------------------------
# Generation: batched greedy (or sampled) decoding with a KV cache


def _pick(logits, temperature, top_p, generator):
    if temperature <= 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
        sorted_probs, order = probs.sort(-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_stream(model, prompts, max_new_tokens, eos_id=None, batch_size=None, temperature=0.0, top_p=1.0, seed=None):
    """Yield (row, token, done) for each new token of each prompt, as soon as it exists.

    Up to batch_size prompts (default: all) decode together in one preallocated KV cache, one slot each;
    every row keeps its true positions, so results equal running each prompt alone. A row is done at
    eos_id (which is yielded) or after max_new_tokens. Its slot then takes the next waiting prompt
    (continuous batching: the batch stays full), or leaves the batch when none waits.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt")
    if not prompts or max_new_tokens < 1:
        return
    device = next(model.parameters()).device
    slots = min(batch_size or len(prompts), len(prompts))
    cache = KVCache(model.cfg, slots, max(map(len, prompts)) + max_new_tokens, device, model.embed_tokens.weight.dtype)
    rows, counts = [None] * slots, [0] * slots  # the prompt decoding in each slot (None: free), its new tokens
    tokens = torch.zeros(slots, dtype=torch.long, device=device)  # each slot's next input token and its position
    positions = torch.zeros(slots, dtype=torch.long, device=device)
    waiting = collections.deque(range(len(prompts)))
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    while True:
        free = [s for s, row in enumerate(rows) if row is None]
        if len(free) > len(waiting):  # more free slots than prompts: the surplus leaves the batch
            keep = [s for s, row in enumerate(rows) if row is not None] + free[:len(waiting)]
            keep.sort()
            if not keep:
                return
            rows, counts = [rows[s] for s in keep], [counts[s] for s in keep]
            keep = torch.tensor(keep, device=device)
            tokens, positions = tokens[keep], positions[keep]
            cache.keep(keep)
            free = [s for s, row in enumerate(rows) if row is None]
        if free:  # admit: prefill all but the last prompt token, which the decode step below feeds
            new = [waiting.popleft() for _ in free]
            prefill = [(s, prompts[i][:-1]) for s, i in zip(free, new) if len(prompts[i]) > 1]
            if prefill:
                _prefill(model, cache, *zip(*prefill))
            for s, i in zip(free, new):
                rows[s], counts[s] = i, 0
            free_t = torch.tensor(free, device=device)
            tokens[free_t] = torch.tensor([prompts[i][-1] for i in new], device=device)
            positions[free_t] = torch.tensor([len(prompts[i]) - 1 for i in new], device=device)
        logits = model(tokens[:, None], cache, positions[:, None])[:, -1]
        tokens, positions = _pick(logits, temperature, top_p, generator), positions + 1
        for s, token in enumerate(tokens.tolist()):  # the one host sync per step
            counts[s] += 1
            done = token == eos_id or counts[s] == max_new_tokens
            yield rows[s], token, done
            if done:
                rows[s] = None


def _prefill(model, cache, slots, prompts):
    """Compute the keys/values of `prompts` (right-padded together) and write them into cache `slots`."""
    device = cache.k[0].device
    ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    part = KVCache(model.cfg, len(prompts), ids.shape[1], device, cache.k[0].dtype)
    model.hidden_states(ids, part, torch.arange(ids.shape[1], device=device).expand_as(ids))
    cache.put(list(slots), part)


def generate(model, prompts, max_new_tokens, eos_id=None, batch_size=None, **sampling):
    """Token ids generated for each prompt (eos included when reached)."""
    out = [[] for _ in prompts]
    for row, token, _ in generate_stream(model, prompts, max_new_tokens, eos_id, batch_size, **sampling):
        out[row].append(token)
    return out


# -----------------------------------------------------------------------------
# Tokenizer


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


class Tokenizer:
    """The official tokenizer.json through `tokenizers`, in one of two variants.

    base: no chat template, eos <|endoftext|>.
    reasoning: prompts wrapped as <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n, eos <|im_end|>.
    """

    def __init__(self, tokenizer_json: str, kind="base"):
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
        return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n" if self.kind == "reasoning" else prompt

    def encode(self, text, chat_wrapped=None):
        """Token ids; chat_wrapped defaults to True for the reasoning variant (prompts), pass False for targets."""
        if chat_wrapped is None:
            chat_wrapped = self.kind == "reasoning"
        return self.tok.encode(self.wrap(text) if chat_wrapped else text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        """Unwrapped ids for many texts at once, on all CPU cores."""
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]  # no offsets: 2x faster

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)


def tiny_tokenizer_json():
    """A byte-level tokenizer (256 byte tokens + the Qwen3 special-token strings) built in code."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    # id = byte value; the characters are ByteLevel's printable stand-ins for the 256 bytes (GPT-2's mapping)
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    vocab = {(chr(b) if b in printable else chr(next(others))): b for b in range(256)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok.to_str()


def load_tokenizer(name_or_path, kind="base", cache_dir=None):
    """Tokenizer from a repo id, a local model directory, a tokenizer.json file, or 'tiny' / 'random-0.6B'."""
    if name_or_path in ("tiny", "random-0.6B"):  # the random models use the byte-level tokenizer
        return Tokenizer(tiny_tokenizer_json(), kind)
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path.parent}: copy the official one there")
    elif not path.is_file():  # a Hub repo id: fetch tokenizer.json alone, not the weights
        path = hub_files(str(name_or_path), ["tokenizer.json"], cache_dir)[0]
    return Tokenizer(path.read_text(encoding="utf-8"), kind)


# -----------------------------------------------------------------------------
# Downloads: retries, resume of partial files, temp file then rename, size check


def default_cache_dir():
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "reasoning-distill"))


class DownloadError(RuntimeError):
    pass


class Progress:
    """A minimal progress bar on stderr: done/total, rate and ETA. Redrawn in place five times a second
    on a terminal; one line every 30 s when stderr is a file or a pipe."""

    def __init__(self, total=None, desc="", unit="it", scale=1):
        self.total, self.desc, self.unit, self.scale = total, desc, unit, scale
        self.done, self.start, self.last = 0, time.time(), time.time()
        self.tty = sys.stderr.isatty()

    def update(self, n=1):
        self.done += n
        now = time.time()
        if now - self.last > (0.2 if self.tty else 30) or (self.tty and self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            of = f"/{self.total / self.scale:.0f}" if self.total else ""
            eta = f" ETA {format_seconds((self.total - self.done) / rate)}" if self.total and rate else ""
            line = f"{self.desc} {self.done / self.scale:.0f}{of} {self.unit} ({rate / self.scale:.1f} {self.unit}/s){eta}"
            sys.stderr.write(f"\r{line}   " if self.tty else line + "\n")
            sys.stderr.flush()

    def write(self, message):
        """Print a line above the bar."""
        if self.tty:
            sys.stderr.write("\r\033[K")
        print(message, flush=True)

    def close(self):
        if self.tty:
            sys.stderr.write("\n")


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def download(url, dest, retries=4, session=None, chunk=1 << 16):
    """Download url to dest. Partial data lives in dest.part and is resumed with a Range request;
    the file is renamed into place only once its size matches the server's Content-Length."""
    import requests
    session = session or requests.Session()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
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
        except Exception as e:  # connection errors, timeouts, 5xx: retry with backoff, keeping the partial file
            last_error = e
            if attempt + 1 < retries:
                time.sleep(min(2 ** attempt, 10))
    raise DownloadError(f"could not download {url} after {retries} tries: {type(last_error).__name__}: {last_error}")


# -----------------------------------------------------------------------------
# Official weights: Hugging Face layout (config.json, tokenizer.json, model*.safetensors)

HF_URL = "https://huggingface.co/{repo}/resolve/main/{file}"


def shard_names(index_path):
    """The weight files listed by a model.safetensors.index.json."""
    return sorted(set(json.loads(Path(index_path).read_text())["weight_map"].values()))


def _complete(d: Path):
    """Config and every weight file present (the tokenizer is loaded, and fetched, on its own)."""
    if not (d / "config.json").exists():
        return False
    if (d / "model.safetensors").exists():
        return True
    index = d / "model.safetensors.index.json"
    return index.exists() and all((d / f).exists() for f in shard_names(index))


def _repo_cache_dir(repo, cache_dir):
    return Path(cache_dir or default_cache_dir()) / "models" / repo.replace("/", "--")


def hub_files(repo, files, cache_dir=None):
    """Local paths of files from a Hub repo, downloaded once into the cache (a second run makes no request)."""
    if repo.count("/") != 1:
        raise FileNotFoundError(f"{repo!r} is neither a local path nor a Hugging Face repo id like 'Qwen/Qwen3-0.6B-Base'")
    d = _repo_cache_dir(repo, cache_dir)
    try:
        return [d / f if (d / f).exists() else download(HF_URL.format(repo=repo, file=f), d / f) for f in files]
    except DownloadError as e:  # the first line keeps the cause (e.g. "HTTP 404", which the shard probe looks for)
        raise DownloadError(f"{e}\nCould not fetch {repo} from the Hugging Face Hub. On a machine with internet, download "
                            f"config.json, tokenizer.json and model*.safetensors from https://huggingface.co/{repo} "
                            f"into {d} (or any directory, and pass that directory instead of the repo id).") from None


def resolve_model_dir(name_or_dir, cache_dir=None):
    """A local model directory for a path or a Hub repo id, downloading what is missing (once)."""
    if Path(name_or_dir).is_dir():
        d = Path(name_or_dir)
        if not _complete(d):
            raise FileNotFoundError(f"{d} is not a Hugging Face model directory: it needs config.json and "
                                    "model.safetensors (or model.safetensors.index.json with its shards)")
        return d
    repo = str(name_or_dir)
    d = _repo_cache_dir(repo, cache_dir)
    if _complete(d):
        return d
    hub_files(repo, ["config.json", "tokenizer.json"], cache_dir)
    try:  # sharded checkpoints have an index; single-file ones answer 404
        shards = shard_names(hub_files(repo, ["model.safetensors.index.json"], cache_dir)[0])
    except DownloadError as e:
        if "HTTP 404" not in str(e):
            raise
        shards = ["model.safetensors"]
    hub_files(repo, shards, cache_dir)
    return d


def hf_name(name):
    return name if name == "lm_head.weight" else "model." + name


def load_state_dict_strict(model, tensors, source):
    """Copy tensors (official names) into the model; any missing, unexpected or misshapen tensor is an error."""
    own = {hf_name(k): v for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        own.pop("lm_head.weight")
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}  # some tied checkpoints store a copy
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source}: missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for name, t in tensors.items():
        if t.shape != own[name].shape:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(t.shape)}, the config needs {tuple(own[name].shape)}")
    with torch.no_grad():
        for name, t in tensors.items():
            own[name].copy_(t)


def empty_model(cfg, device, dtype):
    """A model with uninitialised weights (no slow random init for weights about to be overwritten)."""
    with torch.device("meta"):
        model = Qwen3(cfg)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # to_empty unties
    return model


def from_pretrained(name_or_dir, device="cpu", dtype=torch.float32, cache_dir=None):
    """Model (eval mode) from a Hub repo id or a local Hugging Face-layout directory."""
    from safetensors.torch import load_file
    d = resolve_model_dir(name_or_dir, cache_dir)
    cfg = Qwen3Config.from_hf(json.loads((d / "config.json").read_text()))
    single = (d / "model.safetensors").exists()
    files = ["model.safetensors"] if single else shard_names(d / "model.safetensors.index.json")
    tensors = {}
    for f in files:
        tensors.update(load_file(d / f))
    model = empty_model(cfg, device, dtype)
    load_state_dict_strict(model, tensors, d)
    return model.eval()


def export_hf(model, tokenizer, out_dir):
    """Write config.json, model.safetensors and tokenizer.json loadable by transformers, vLLM and from_pretrained."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {hf_name(k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(model.cfg.to_hf(), indent=2))
    (out / "tokenizer.json").write_text(tokenizer.json, encoding="utf-8")
    eos = {"eos_token": tokenizer.eos_token, "pad_token": "<|endoftext|>"}
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2TokenizerFast", **eos}, indent=2))
    return out


# -----------------------------------------------------------------------------
# Checkpoints that describe themselves: weights + config + tokenizer, loaded with weights_only=True


def save_checkpoint(path, model, tokenizer, **extra):
    """Atomic save (temp file, then rename). extra: optimizer state, step, RNG states... (plain data only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": "qwen3-distill-v1", "config": asdict(model.cfg), "model": model.state_dict(),
             "tokenizer": {"json": tokenizer.json, "kind": tokenizer.kind}, **extra}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path, device="cpu"):
    """The checkpoint dict, never unpickling anything but tensors and plain data.
    A run directory stands for its latest epoch checkpoint."""
    if Path(path).is_dir():
        epochs = sorted(Path(path).glob("*-step*-epoch*.pth"), key=lambda p: int(re.search(r"-step(\d+)-", p.name).group(1)))
        if not epochs:
            raise FileNotFoundError(f"no epoch checkpoint (*-step*-epoch*.pth) in {path}")
        path = epochs[-1]
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != "qwen3-distill-v1":
        raise ValueError(f"{path}: not a checkpoint written by this project (a bare state dict? "
                         "use --model to give the architecture and load it with --checkpoint_path in train.py)")
    return state


def load_checkpoint(path, device="cpu", dtype=torch.float32):
    """(model, tokenizer, checkpoint dict) rebuilt from a checkpoint alone."""
    state = read_checkpoint(path, device)
    model = empty_model(checkpoint_config(state), device, dtype)
    load_weights(model, state, path)
    tokenizer = Tokenizer(state["tokenizer"]["json"], state["tokenizer"]["kind"])
    return model.eval(), tokenizer, state


def checkpoint_config(state):
    return Qwen3Config(**{k: v for k, v in state["config"].items() if k in {f.name for f in fields(Qwen3Config)}})


def load_weights(model, state, path):
    """Load a checkpoint's weights into a model of the same config, or say why not in one line."""
    if checkpoint_config(state) != model.cfg:
        diff = {k: (v, getattr(model.cfg, k)) for k, v in asdict(checkpoint_config(state)).items() if getattr(model.cfg, k) != v}
        raise ValueError(f"{path}: checkpoint is for a different model config (checkpoint vs model: {diff})")
    with torch.no_grad():
        model.load_state_dict(state["model"])


def load_for_inference(model, which_model, checkpoint_path=None, device="cpu", dtype=torch.float32, cache_dir=None):
    """(model, tokenizer) from a checkpoint (which carries both), else a model name and a tokenizer variant."""
    if checkpoint_path:
        return load_checkpoint(checkpoint_path, device, dtype)[:2]
    return load_model(model, device, dtype, cache_dir), load_tokenizer(model, which_model, cache_dir)


RANDOM_CONFIGS = {"tiny": TINY, "random-0.6B": Qwen3Config()}  # random init: tests, the walkthrough, benchmarks


def load_model(name, device="cpu", dtype=torch.float32, cache_dir=None, seed=0):
    """'tiny' or 'random-0.6B' (the 0.6B shape, random init, seeded), a Hub repo id or a local directory."""
    if name in RANDOM_CONFIGS:
        torch.manual_seed(seed)
        with torch.device(device):
            return Qwen3(RANDOM_CONFIGS[name]).to(dtype=dtype).eval()
    return from_pretrained(name, device, dtype, cache_dir)


def peak_memory_gib(device):
    """Peak GPU memory allocated on CUDA; elsewhere the process's peak resident memory."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def pick_dtype(name, device):
    """'auto': bfloat16 on CUDA (as the reference keeps the model), float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def pick_device(name="auto"):
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


# -----------------------------------------------------------------------------
# Command line: chat with a model or a checkpoint (streamed), export a checkpoint to the HF layout


def parse_args(argv=None):
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="stream a greedy answer to one prompt",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("prompt")
    g.add_argument("--model", default="Qwen/Qwen3-0.6B-Base", help="Hub repo id, local directory or 'tiny'")
    g.add_argument("--checkpoint_path", help="a checkpoint of this project (overrides --model)")
    g.add_argument("--which_model", default="base", choices=["base", "reasoning"], help="tokenizer variant")
    g.add_argument("--max_new_tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top_p", type=float, default=1.0)
    g.add_argument("--device", default="auto")
    e = sub.add_parser("export", help="write a checkpoint in the Hugging Face layout",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("checkpoint_path")
    e.add_argument("out_dir")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.cmd == "export":
        model, tok, _ = load_checkpoint(args.checkpoint_path)
        print(f"wrote {export_hf(model, tok, args.out_dir)}")
        return
    model, tok = load_for_inference(args.model, args.which_model, args.checkpoint_path, pick_device(args.device))
    answer, shown = [], ""
    for _, token, _ in generate_stream(model, [tok.encode(args.prompt)], args.max_new_tokens, tok.eos_token_id,
                                       temperature=args.temperature, top_p=args.top_p):
        if token != tok.eos_token_id:  # decode the whole answer so far: one token may hold half a character
            answer.append(token)
            text = tok.decode(answer)
            print(text[len(shown):], end="", flush=True)
            shown = text
    print()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, DownloadError) as err:
        sys.exit(f"error: {err}")
