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


def test_chunked_loss_matches_plain_loss_in_bfloat16():
    model = qwen3.load_model("tiny", "cuda", torch.bfloat16, seed=2)
    ids = torch.randint(0, 256, (2, 64), device="cuda")
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 20:] = True
    chunked = qwen3.answer_loss(model, ids, ids, mask, chunk_size=16)
    plain = torch.nn.functional.cross_entropy(model(ids)[mask].float(), ids[mask])
    torch.testing.assert_close(chunked, plain, atol=2e-2, rtol=2e-2)


def test_training_run_on_gpu(tmp_path):
    rows, _ = data.synth_dataset(40, 0, seed=1)
    (tmp_path / "t.json").write_text(__import__("json").dumps(rows))
    train.main(["--model", "tiny", "--which_model", "base", "--data_path", str(tmp_path / "t.json"), "--out_dir",
                str(tmp_path / "run"), "--validation_size", "4", "--epochs", "1", "--batch_size", "4", "--lr", "3e-3",
                "--device", "cuda", "--cache_dir", str(tmp_path / "cache")])
    assert list((tmp_path / "run").glob("*epoch1.pth"))
