import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import data
import qwen3
from conftest import varied_model

CONFIGS = [  # GQA ratios, tied and untied heads, head_dim != hidden / heads
    dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=2, head_dim=32, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    dict(vocab_size=280, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
         num_key_value_heads=1, head_dim=16, rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False),
    dict(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
         num_key_value_heads=2, head_dim=24, rope_theta=500.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
    dict(vocab_size=270, hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=2, head_dim=12, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
         attention_bias=True),
]


def random_official_weights(cfg, seed):
    """Random tensors under the official Hugging Face Qwen3 names."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2
    h, d, hq, hk = cfg["hidden_size"], cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = {"model.embed_tokens.weight": r(cfg["vocab_size"], h), "model.norm.weight": 1 + r(h)}
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = r(cfg["vocab_size"], h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        if cfg.get("attention_bias"):
            w.update({p + f"self_attn.{n}_proj.bias": r(size) for n, size in
                      (("q", hq * d), ("k", hk * d), ("v", hk * d), ("o", h))})
        w.update({p + "input_layernorm.weight": 1 + r(h), p + "post_attention_layernorm.weight": 1 + r(h),
                  p + "self_attn.q_proj.weight": r(hq * d, h), p + "self_attn.k_proj.weight": r(hk * d, h),
                  p + "self_attn.v_proj.weight": r(hk * d, h), p + "self_attn.o_proj.weight": r(h, hq * d),
                  p + "self_attn.q_norm.weight": 1 + r(d), p + "self_attn.k_norm.weight": 1 + r(d),
                  p + "mlp.gate_proj.weight": r(cfg["intermediate_size"], h),
                  p + "mlp.up_proj.weight": r(cfg["intermediate_size"], h),
                  p + "mlp.down_proj.weight": r(h, cfg["intermediate_size"])})
    return w


def naive_reference_logits(w, cfg, ids):
    """An independent, deliberately plain Qwen3 forward in float64: per-head loops, explicit softmax,
    RoPE as a complex rotation of (x[i], x[i + D/2]) pairs."""
    w = {k: v.double() for k, v in w.items()}
    eps, d = cfg["rms_norm_eps"], cfg["head_dim"]
    rms = lambda x, g: g * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    T = len(ids)
    pos = torch.arange(T, dtype=torch.float64)[:, None]
    freq = cfg["rope_theta"] ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    rot = torch.polar(torch.ones(T, d // 2, dtype=torch.float64), pos * freq)

    def rope(x):  # x [T, d]
        z = torch.complex(x[:, :d // 2], x[:, d // 2:]) * rot
        return torch.cat([z.real, z.imag], -1)

    x = w["model.embed_tokens.weight"][ids]
    group = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        hdn = rms(x, w[p + "input_layernorm.weight"])
        bias = lambda n: w.get(p + f"self_attn.{n}_proj.bias", 0)
        q = hdn @ w[p + "self_attn.q_proj.weight"].T + bias("q")
        k = hdn @ w[p + "self_attn.k_proj.weight"].T + bias("k")
        v = hdn @ w[p + "self_attn.v_proj.weight"].T + bias("v")
        heads = []
        for hq in range(cfg["num_attention_heads"]):
            hk = hq // group
            qh = rope(rms(q[:, hq * d:(hq + 1) * d], w[p + "self_attn.q_norm.weight"]))
            kh = rope(rms(k[:, hk * d:(hk + 1) * d], w[p + "self_attn.k_norm.weight"]))
            scores = qh @ kh.T / math.sqrt(d)
            scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), -math.inf)
            heads.append(torch.softmax(scores, -1) @ v[:, hk * d:(hk + 1) * d])
        x = x + torch.cat(heads, -1) @ w[p + "self_attn.o_proj.weight"].T + bias("o")
        hdn = rms(x, w[p + "post_attention_layernorm.weight"])
        gate, up = hdn @ w[p + "mlp.gate_proj.weight"].T, hdn @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return rms(x, w["model.norm.weight"]) @ head.T


def write_hf_dir(path, cfg, weights, tokenizer_json, shards=1):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_act": "silu",
                                                  "max_position_embeddings": 512, **cfg}))
    (path / "tokenizer.json").write_text(tokenizer_json)
    if shards == 1:
        save_file(weights, path / "model.safetensors")
        return path
    names = sorted(weights)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[s::shards]}
        save_file(part, path / file)
        weight_map.update({n: file for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture(scope="module")
def tiny_tok_json():
    return qwen3.tiny_tokenizer_json()


@pytest.mark.parametrize("n", range(len(CONFIGS)))
def test_hf_directory_matches_independent_reference(tmp_path, tiny_tok_json, n):
    cfg = CONFIGS[n]
    weights = random_official_weights(cfg, seed=n)
    model_dir = write_hf_dir(tmp_path / "m", cfg, weights, tiny_tok_json, shards=1 + n % 2)
    (model_dir / "tokenizer.json").unlink()  # weights and config are enough for the model
    model = qwen3.load_model(model_dir)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        qwen3.load_tokenizer(model_dir)
    ids = torch.randint(0, cfg["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(n))
    logits = model(ids)
    assert logits.shape == (2, 37, cfg["vocab_size"])
    for b in range(2):
        expected = naive_reference_logits(weights, cfg, ids[b])
        torch.testing.assert_close(logits[b].double(), expected, atol=1e-4, rtol=1e-4)


def test_config_reads_nested_rope_parameters_and_defaults():
    hf = {k: v for k, v in CONFIGS[0].items() if k != "rope_theta"}
    cfg = qwen3.Qwen3Config.from_hf({**hf, "rope_parameters": {"rope_theta": 1234.0, "rope_type": "default"}})
    assert cfg.rope_theta == 1234.0 and cfg.head_dim == 32
    no_head_dim = {k: v for k, v in hf.items() if k != "head_dim"}
    assert qwen3.Qwen3Config.from_hf(no_head_dim).head_dim == 128  # transformers' default, not hidden / heads
    with pytest.raises(ValueError, match="rope_scaling"):
        qwen3.Qwen3Config.from_hf({**CONFIGS[0], "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


@pytest.mark.parametrize("problem,match", [("missing", "missing tensors"),
                                           ("unexpected", "unexpected tensors"),
                                           ("shape", "has shape")])
def test_strict_loading_names_the_bad_tensor(tmp_path, tiny_tok_json, problem, match):
    cfg = CONFIGS[1]
    weights = random_official_weights(cfg, seed=0)
    if problem == "missing":
        del weights["model.layers.1.mlp.up_proj.weight"]
    elif problem == "unexpected":
        weights["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2)
    else:
        weights["model.norm.weight"] = torch.ones(7)
    with pytest.raises(ValueError, match=match) as err:
        qwen3.load_model(write_hf_dir(tmp_path / "m", cfg, weights, tiny_tok_json))
    assert "model.layers" in str(err.value) or "model.norm" in str(err.value)


@pytest.mark.parametrize("config", CONFIGS)
def test_kv_cache_logits_equal_full_forward(config):
    torch.manual_seed(0)
    model = qwen3.Qwen3(qwen3.Qwen3Config(**config, max_position_embeddings=512)).eval()
    ids = torch.randint(0, config["vocab_size"], (1, 30))
    full = model(ids)
    cache = qwen3.KVCache(model.cfg, 1, 64, "cpu", torch.float32)
    cache.locate(torch.arange(12)[None], 12)
    parts = [model(ids[:, :12], cache)]
    for t in range(12, 30):  # then one token at a time
        cache.locate(torch.tensor([[t]]), t + 1)
        parts.append(model(ids[:, t:t + 1], cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def stop_at(answers, eos):
    return [a[:a.index(eos) + 1] if eos in a else a for a in answers]


def test_batched_generation_equals_one_prompt_at_a_time():
    model = varied_model(3)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 1)]
    single = [qwen3.generate(model, [p], 25)[0] for p in prompts]
    assert qwen3.generate(model, prompts, 25) == single
    assert all(len(s) == 25 for s in single) and len({tuple(s) for s in single}) == 5
    eos = single[1][3]  # rows stop at eos: a token that the second answer produces early
    assert qwen3.generate(model, prompts, 25, eos_id=eos) == stop_at(single, eos)


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy():
    model = qwen3.load_model("tiny", seed=0)
    prompt = [[5, 6, 7, 8]]
    hot = qwen3.Sampling(temperature=1.0, seed=1)
    a = qwen3.generate(model, prompt, 10, sampling=hot)
    assert a == qwen3.generate(model, prompt, 10, sampling=hot)
    assert a != qwen3.generate(model, prompt, 10, sampling=qwen3.Sampling(temperature=1.0, seed=2))
    nucleus = qwen3.Sampling(temperature=1.0, top_p=1e-9, seed=2)
    assert qwen3.generate(model, prompt, 10, sampling=nucleus) == qwen3.generate(model, prompt, 10)
    assert qwen3.generate(model, prompt, 10, sampling=qwen3.Sampling(1.0, top_k=1, seed=3)) == \
        qwen3.generate(model, prompt, 10)


def test_top_k_and_top_p_keep_only_their_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    uniforms = torch.rand(2000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    drawn = lambda **kw: qwen3.pick_tokens(logits, qwen3.Sampling(temperature=1.0, **kw), uniforms)
    assert set(drawn(top_k=2).tolist()) == {0, 1}
    assert set(drawn(top_p=0.7).tolist()) == {0, 1}  # 0.5 + 0.3 reach 0.7: the smallest such set
    assert set(drawn(top_p=0.85).tolist()) == {0, 1, 2}
    counts = torch.bincount(drawn(), minlength=4) / 2000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04, rtol=0)
    with pytest.raises(ValueError, match="top_p"):
        qwen3.Sampling(top_p=1.5).check()
    with pytest.raises(ValueError, match="temperature"):
        qwen3.Sampling(temperature=-1).check()


def test_sampled_answers_do_not_depend_on_the_batch():
    model = varied_model(5)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (6, 15, 3, 11)]
    sampling = qwen3.Sampling(temperature=0.8, top_p=0.95, top_k=50, seed=7)
    single = [qwen3.generate(model, [p], 20, sampling=sampling, keys=[k])[0] for k, p in enumerate(prompts)]
    assert len({tuple(s) for s in single}) == 4
    for batch_size in (1, 2, 4):
        assert qwen3.generate(model, prompts, 20, batch_size=batch_size, sampling=sampling) == single
    # another neighbour in the batch changes nothing either: the same key, the same answer
    assert qwen3.generate(model, [prompts[1], prompts[2]], 20, sampling=sampling, keys=[1, 2]) == single[1:3]
    greedy = qwen3.generate(model, prompts, 20)
    assert greedy != single


def test_samples_of_one_prompt_share_one_prefill(monkeypatch):
    model = varied_model(6)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8]]
    requests = [prompts[0]] * 3 + [prompts[1]] * 2
    keys = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    sampling = qwen3.Sampling(temperature=1.0, seed=3)
    separate = [
        qwen3.generate(model, [p], 12, sampling=sampling, keys=[k])[0] for p, k in zip(requests, keys)
    ]
    prefilled = []
    real = qwen3.Qwen3.hidden_states
    def counting(self, ids, cache=None):
        if ids.shape[1] > 1:  # a prefill: several tokens at once
            prefilled.extend(map(tuple, ids.tolist()))
        return real(self, ids, cache)
    monkeypatch.setattr(qwen3.Qwen3, "hidden_states", counting)
    for batch_size in (5, 2):
        prefilled.clear()
        assert (
            qwen3.generate(model, requests, 12, batch_size=batch_size, sampling=sampling, keys=keys)
            == separate
        )
        assert len(prefilled) == 2  # two prompts, each prefilled once for all its samples
    assert len({tuple(s) for s in separate[:3]}) == 3  # the samples differ


def test_simple_generation_equals_the_fast_one():
    model = varied_model(7)
    prompts = [[1, 2, 3], [9] * 12, [4]]
    fast = qwen3.generate(model, prompts, 15)
    assert [qwen3.generate_simple(model, p, 15) for p in prompts] == fast
    eos = fast[1][4]
    assert [qwen3.generate_simple(model, p, 15, eos_id=eos) for p in prompts] == stop_at(fast, eos)


def test_thinking_budget_closes_the_thought_at_exactly_b_tokens():
    model = varied_model(8)
    prompt = [11, 12, 13, 14]
    unforced = qwen3.generate(model, [prompt], 40)[0]
    # stand-ins for the think tags: this random model "opens its thought" with its first token and never
    # closes it
    close_ids = [t for t in range(256) if t not in unforced][:3]
    budget = qwen3.ThinkingBudget(tokens=10, open_id=unforced[0], close_ids=close_ids, answer_tokens=5)
    answer = qwen3.generate(model, [prompt], 40, budget=budget)[0]
    assert answer[:10] == unforced[:10]
    assert answer[10:13] == close_ids  # closed right after 10 tokens: </think> and a blank line
    assert (
        len(answer) == 10 + 3 + 5 and budget.cut_at(answer) == 10
    )  # then the allowance for the final answer
    batched = qwen3.generate(model, [[1, 2], prompt, [7] * 9], 40, batch_size=2, budget=budget)
    assert batched[1] == answer  # per row, whatever shares the batch
    short = qwen3.ThinkingBudget(tokens=50, open_id=unforced[0], close_ids=close_ids)
    assert qwen3.generate(model, [prompt], 40, budget=short)[0] == unforced  # never reached: plain answer
    assert short.cut_at(unforced) is None


def test_tiny_tokenizer_special_tokens_and_chat_template():
    tok = qwen3.load_tokenizer("tiny", "reasoning")
    ids = tok.encode("Hi <think>x</think>", chat_wrapped=False)
    specials = {t: tok.tok.token_to_id(t) for t in qwen3.SPECIAL_TOKENS}
    assert ids.count(specials["<think>"]) == 1 and ids.count(specials["</think>"]) == 1
    assert tok.decode(ids) == "Hi <think>x</think>"
    wrapped = tok.encode("Hi")
    assert (
        wrapped[0] == specials["<|im_start|>"]
        and tok.decode(wrapped) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.eos_token_id == specials["<|im_end|>"]
    assert qwen3.load_tokenizer("tiny", "base").eos_token_id == specials["<|endoftext|>"]
    tiny = qwen3.load_tokenizer("tiny", "base")
    for text in ["héllo ∑ \x00\xff", "12 + 345\n= 357", data.render_prompt("What is 1 + 2?")]:
        assert tiny.decode(tiny.encode(text)) == text  # any text, byte for byte
    assert [tiny.decode([i]) for i in tiny.encode("12 + 345")] == [*"12", " + ", *"345"]  # digits one by one
    # the walkthrough's prompt (152 bytes) in under 80 tokens: the merges fit the project's own template
    assert len(tiny.encode(data.render_prompt("What is 1 + 2 + 3?"))) < 80
    # built by training, yet the same in every process (torchrun ranks and the token cache rely on it)
    import subprocess
    import sys
    code = "import hashlib, qwen3; print(hashlib.sha256(qwen3.tiny_tokenizer_json().encode()).hexdigest())"
    others = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             cwd=qwen3.Path(qwen3.__file__).parent).stdout.strip() for _ in range(2)}
    assert others == {tiny.sha256}
    with pytest.raises(ValueError, match="kind"):
        qwen3.load_tokenizer("tiny", "chat")


def test_real_tokenizer_ids(real_tokenizer_path):
    # expected ids are the published ones (see ../shared/qwen3-tokenizer/README.md)
    base = qwen3.load_tokenizer(real_tokenizer_path, "base")
    reasoning = qwen3.load_tokenizer(real_tokenizer_path, "reasoning")
    assert base.encode("Hello world") == [9707, 1879]
    assert base.encode("<|im_start|>user\nHi<|im_end|>") == [151644, 872, 198, 13048, 151645]
    assert base.encode("<think>") == [151667] and base.encode("</think>") == [151668]
    assert base.eos_token_id == 151643 and reasoning.eos_token_id == 151645
    assert reasoning.encode("Hi") == [151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198]
    assert reasoning.encode("Hi", chat_wrapped=False) == [13048]
    text = "Let $x^2 = \\frac{1}{2}$. ∑ café <think>ok</think>"
    assert base.decode(base.encode(text)) == text


def test_checkpoint_round_trip_and_hf_export(tmp_path):
    model = qwen3.load_model("tiny", seed=5)
    tok = qwen3.load_tokenizer("tiny", "reasoning")
    ids = torch.randint(0, 256, (1, 12))
    path = qwen3.save_checkpoint(tmp_path / "c.pth", model, tok, step=7)
    loaded, tok2, state = qwen3.load_checkpoint(path)
    assert state["step"] == 7 and tok2.kind == "reasoning" and tok2.encode("Hi") == tok.encode("Hi")
    torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)
    exported = qwen3.export_hf(loaded, tok2, tmp_path / "hf")
    again = qwen3.load_model(exported)
    torch.testing.assert_close(again(ids), model(ids), atol=0, rtol=0)
    assert qwen3.load_tokenizer(exported, "reasoning").encode("Hi") == tok.encode("Hi")


def test_checkpoint_loading_never_unpickles_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))
    torch.save({"format": "qwen3-distill-v1", "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        qwen3.read_checkpoint(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        qwen3.read_checkpoint(tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError):
        qwen3.read_checkpoint(tmp_path / "none.pth")
    torch.save(qwen3.load_model("tiny").state_dict(), tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="bare state dict"):
        qwen3.read_checkpoint(tmp_path / "bare.pth")


def test_download_resumes_retries_and_checks_size(tmp_path, file_server):
    body = bytes(range(256)) * 4000
    file_server.files["/f.bin"] = body
    dest = tmp_path / "f.bin"
    file_server.cut_next = 100_000  # the first response breaks off: the second resumes with a Range request
    qwen3.download(file_server.url + "/f.bin", dest)
    assert dest.read_bytes() == body and not (tmp_path / "f.bin.part").exists()
    path, byte_range = file_server.requests[-1]
    assert byte_range.startswith("bytes=") and 0 < int(byte_range[6:-1]) <= 100_000  # resumed, not restarted
    file_server.fail_next = 2  # two server errors, then success
    qwen3.download(file_server.url + "/f.bin", tmp_path / "g.bin")
    assert (tmp_path / "g.bin").read_bytes() == body
    file_server.fail_next = 10
    with pytest.raises(qwen3.DownloadError, match="after 4 tries"):
        qwen3.download(file_server.url + "/f.bin", tmp_path / "h.bin")
    assert not (tmp_path / "h.bin").exists()
    file_server.fail_next = 0
    with pytest.raises(qwen3.DownloadError, match="404"):
        qwen3.download(file_server.url + "/missing", tmp_path / "m.bin")


def test_hub_download_once_then_offline(tmp_path, file_server, monkeypatch, tiny_tok_json):
    cfg = CONFIGS[0]
    src = write_hf_dir(tmp_path / "src", cfg, random_official_weights(cfg, 0), tiny_tok_json)
    for f in src.iterdir():
        file_server.files[f"/Org/Model/resolve/main/{f.name}"] = f.read_bytes()
    monkeypatch.setattr(qwen3, "HF_URL", file_server.url + "/{repo}/resolve/main/{file}")
    tok = qwen3.load_tokenizer("Org/Model", "reasoning", cache_dir=tmp_path / "cache")
    assert [path for path, _ in file_server.requests] == [
        "/Org/Model/resolve/main/tokenizer.json"
    ]  # no weights
    assert tok.encode("Hi") == qwen3.load_tokenizer(src, "reasoning").encode("Hi")
    model = qwen3.load_model("Org/Model", cache_dir=tmp_path / "cache")
    assert any(
        path.endswith("model.safetensors.index.json") for path, _ in file_server.requests
    )  # probed, 404
    n = len(file_server.requests)
    file_server.close()  # offline from now on: the cache must be enough
    again = qwen3.load_model("Org/Model", cache_dir=tmp_path / "cache")
    assert len(file_server.requests) == n
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(again(ids), model(ids))
    with pytest.raises(qwen3.DownloadError, match="download config.json, tokenizer.json and model"):
        qwen3.load_model("Org/Other", cache_dir=tmp_path / "cache")


def test_import_pulls_in_no_optional_packages():
    import subprocess
    import sys
    code = (
        "import sys, qwen3; print([m for m in ('requests', 'safetensors', 'tokenizers', 'matplotlib', "
        "'sympy', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=qwen3.Path(qwen3.__file__).parent
    )
    assert out.stdout.strip() == "[]", out.stderr


def test_the_model_file_alone_is_enough(tmp_path):
    """A forker copies qwen3.py into an empty directory: it loads the tiny model, generates (the plain and the
    batched generator agree), saves a checkpoint and reads it back, without requests and without any other
    file of this project."""
    import ast
    import shutil
    import subprocess
    import sys
    shutil.copy(qwen3.__file__, tmp_path)
    code = """
import sys
sys.modules["requests"] = None  # as if it were not installed: importing it fails
import qwen3
model, tok = qwen3.load_model("tiny", seed=1), qwen3.load_tokenizer("tiny", "base")
prompt = tok.encode("What is 1 + 2?")
answer = qwen3.generate(model, [prompt], 8, tok.eos_token_id)[0]
path = qwen3.save_checkpoint("c.pth", model, tok)
loaded, tok2, _ = qwen3.load_checkpoint(path)
same = answer == qwen3.generate_simple(model, prompt, 8, tok.eos_token_id) == \\
    qwen3.generate(loaded, [tok2.encode("What is 1 + 2?")], 8, tok2.eos_token_id)[0]
print(len(answer), same)
"""
    out = subprocess.run([sys.executable, "-E", "-s", "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["8", "True"], out.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["__pycache__", "c.pth", "qwen3.py"]
    imported = {alias.name.split(".")[0] if isinstance(node, ast.Import) else node.module.split(".")[0]
                for node in ast.walk(ast.parse(Path(qwen3.__file__).read_text()))
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    assert imported - sys.stdlib_module_names == {"torch", "tokenizers", "safetensors", "requests"}
    assert "distributed" not in Path(qwen3.__file__).read_text()
