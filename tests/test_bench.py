import json

import bench


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_train_benchmark_reports_every_figure(capsys):
    bench.main(["train", "--model", "tiny", "--batch_size", "4", "--seq_len", "64", "--steps", "2", "--warmup", "1",
                "--compare", "--peak_tflops", "1.0", "--json"])
    result = last_json(capsys)
    for key in ("tokens_per_sec", "tflops", "mfu", "peak_memory_gib", "baseline_tokens_per_sec", "speedup"):
        assert result[key] > 0, key
    assert result["mfu"] == result["tflops"] / 1.0


def test_generate_benchmark_matches_sequential(capsys):
    bench.main(["generate", "--model", "tiny", "--batch_size", "3", "--seq_len", "16", "--max_new_tokens", "5",
                "--compare", "--json"])
    result = last_json(capsys)
    assert result["identical_to_sequential"] is True and result["speedup"] > 0


def test_data_benchmark_tokenizes_and_caches(capsys):
    bench.main(["data", "--tokenizer", "tiny", "--rows", "50", "--repeat_thinking", "1", "--json"])
    result = last_json(capsys)
    assert result["rows"] == 50 and result["tokens"] > 50 * 100 and result["cold_s"] > 0 and result["cached_s"] > 0
