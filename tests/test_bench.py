import dataclasses
import json

import pytest

import bench
import qwen3


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_train_benchmark_reports_every_figure(capsys):
    bench.main(
        [
            "train",
            "--model",
            "tiny",
            "--batch_size",
            "4",
            "--seq_len",
            "64",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--compare",
            "--peak_tflops",
            "1.0",
            "--json",
        ]
    )
    result = last_json(capsys)
    for key in ("tokens_per_sec", "tflops", "mfu", "peak_memory_gib", "optimizer_step_s",
                "baseline_tokens_per_sec", "speedup"):
        assert result[key] > 0, key
    assert result["mfu"] == result["tflops"] / 1.0


def test_train_benchmark_of_some_blocks_in_stochastic_rounding_counts_the_moved_weights(capsys):
    bench.main(["train", "--model", "tiny", "--layers", "1", "--dtype", "bfloat16-sr", "--batch_size", "2",
                "--seq_len", "32", "--steps", "2", "--warmup", "0", "--count_changes", "--json"])
    result = last_json(capsys)
    assert result["precision"] == "bfloat16-sr" and result["optimizer_step_s"] > 0
    # lr 1e-5 on weights of about 0.02-1: far below bfloat16's spacing, so stochastic rounding moves a few
    assert 0 < result["changed_fraction"] < 0.5
    one_block = qwen3.Qwen3(dataclasses.replace(qwen3.TINY, num_hidden_layers=1))
    # the FLOPs of one block's model
    assert result["tflops"] * 1e12 / result["tokens_per_sec"] == pytest.approx(one_block.flops_per_token(24))


def test_generate_benchmark_matches_sequential(capsys):
    bench.main(
        [
            "generate",
            "--model",
            "tiny",
            "--batch_size",
            "3",
            "--seq_len",
            "16",
            "--max_new_tokens",
            "5",
            "--compare",
            "--json",
        ]
    )
    result = last_json(capsys)
    assert result["identical_to_sequential"] is True and result["speedup"] > 0


def test_data_benchmark_tokenizes_and_caches(capsys):
    bench.main(["data", "--tokenizer", "tiny", "--rows", "50", "--repeat_thinking", "1", "--json"])
    result = last_json(capsys)
    assert (
        result["rows"] == 50
        and result["tokens"] > 50 * 100
        and result["cold_s"] > 0
        and result["cached_s"] > 0
    )


def test_train_benchmark_with_a_teacher_reports_the_extra_cost(capsys):
    bench.main(
        [
            "train",
            "--model",
            "tiny",
            "--batch_size",
            "2",
            "--seq_len",
            "32",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--teacher",
            "tiny",
            "--on_policy_tokens",
            "8",
            "--json",
        ]
    )
    result = last_json(capsys)
    assert result["kd_tokens_per_sec"] > 0 and result["kd_time_ratio"] > 0 and "kd_extra_memory_gib" in result
    parts = [result[f"on_policy_{k}_s"] for k in ("rollout", "teacher", "update")]
    assert all(p > 0 for p in parts) and sum(parts) == pytest.approx(result["on_policy_step_s"])
    assert 2 <= result["on_policy_answer_tokens"] <= 2 * 8  # two prompts, at most 8 tokens each


def test_converge_trains_until_the_target_loss(tmp_path, capsys):
    rows, _ = __import__("data").synth_dataset(120, 0, seed=2)
    (tmp_path / "t.json").write_text(json.dumps(rows))
    train_flags = ["--model", "tiny", "--which_model", "base", "--data_path", str(tmp_path / "t.json"),
                   "--validation_size", "10", "--lr", "5e-3", "--batch_size", "4", "--epochs", "3",
                   "--cache_dir", str(tmp_path)]
    bench.main(["converge", "--target_loss", "1.5", "--eval_every", "40", "--json", "--", *train_flags])
    result = last_json(capsys)
    assert result["reached"] and result["val_loss"] <= 1.5 < result["curve"][0][2]
    assert result["seconds"] > 0 and len(result["curve"]) > 1 and result["examples"] < 3 * 110
    bench.main(["converge", "--target_loss", "0.0001", "--eval_every", "200", "--json", "--", *train_flags,
                "--epochs", "1"])
    assert not last_json(capsys)["reached"]


def test_memory_estimate_counts_bytes_per_parameter_by_precision(capsys):
    bench.main(["memory", "--model", "random-0.6B", "--json"])
    result = last_json(capsys)
    params = result["params"]
    assert 0.59e9 < params < 0.61e9  # Qwen3-0.6B, tied embeddings
    # weights, gradients and AdamW's two moments: 4 x 4 bytes in float32, 4 x 2 in bfloat16
    for mode, per_param in (("float32", 16), ("bfloat16", 16), ("pure-bfloat16", 8), ("bfloat16-sr", 8)):
        assert result[mode]["state_gib"] == pytest.approx(params * per_param / 2**30)
    assert result["bfloat16-sr"]["total_gib"] == result["pure-bfloat16"]["total_gib"] < 10
    assert result["bfloat16"]["total_gib"] > 12
    bench.main(["memory", "--model", "random-0.6B", "--processes", "2", "--json"])
    assert "bfloat16-sr" not in last_json(capsys)  # no FSDP for it
