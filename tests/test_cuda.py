"""GPU checks: they run where CUDA is present (e.g. the project's H100 sessions) and are skipped elsewhere."""
import pytest
import torch

import data
import qwen3
import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_batched_generation_equals_single_on_gpu_float32():
    model = qwen3.load_model("tiny", "cuda", torch.float32, seed=1)
    prompts = [list(range(5, 5 + n)) for n in (3, 20, 11)]
    assert qwen3.generate(model, prompts, 30) == [qwen3.generate(model, [p], 30)[0] for p in prompts]


@pytest.mark.parametrize("mode", ["bfloat16", "pure-bfloat16"])
def test_chunked_loss_matches_plain_loss_and_updates_are_kept(mode):
    _, weights_dtype, autocast_dtype = train.pick_precision(mode, "cuda")
    model = qwen3.load_model("tiny", "cuda", weights_dtype, seed=2)
    batch = [{"token_ids": torch.randint(0, 256, (64,)), "prompt_len": 20, "row": 0} for _ in range(2)]
    weights = train.token_weights(batch, len(batch), sum(map(train.answer_len, batch)), False)
    with torch.autocast("cuda", autocast_dtype, enabled=autocast_dtype is not None):
        chunked = train.answer_loss(model, batch, weights, "cuda", chunk_size=16)[0]
        plain = train.plain_answer_loss(model, batch, weights, "cuda")
    torch.testing.assert_close(chunked, plain, atol=2e-2, rtol=2e-2)
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    before = [p.detach().clone() for p in norms]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    chunked.backward()
    optimizer.step()
    moved = all((p != b).all() for p, b in zip(norms, before))
    assert moved == (mode == "bfloat16")  # norm weights at 1.0: only float32 master weights take a 1e-5 step


def test_training_run_on_gpu(tmp_path):
    rows, _ = data.synth_dataset(40, 0, seed=1)
    (tmp_path / "t.json").write_text(__import__("json").dumps(rows))
    train.main(
        [
            "--model",
            "tiny",
            "--which_model",
            "base",
            "--data_path",
            str(tmp_path / "t.json"),
            "--out_dir",
            str(tmp_path / "run"),
            "--validation_size",
            "4",
            "--epochs",
            "1",
            "--batch_size",
            "4",
            "--lr",
            "3e-3",
            "--device",
            "cuda",
            "--cache_dir",
            str(tmp_path / "cache"),
        ]
    )  # --dtype auto: bfloat16 mixed
    assert list((tmp_path / "run").glob("*epoch1.pth"))
