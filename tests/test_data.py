import json
import re
import time
from collections import Counter

import pytest

import data
import qwen3


@pytest.fixture(scope="module")
def tok():
    return qwen3.load_tokenizer("tiny", "reasoning")


ROW = {"problem": "What is 1+1?", "gtruth_answer": "2", "message_thinking": " 1 plus 1 is 2. ",
       "message_content": " So \\boxed{2} ", "extra": 1}


def test_prompt_is_the_exact_reference_template():
    assert data.render_prompt("Compute $x$.") == (
        "You are a helpful math assistant.\n"
        "Answer the question and write the final result on a new line as:\n"
        "\\boxed{ANSWER}\n\nQuestion:\nCompute $x$.\n\nAnswer:"
    )


def test_targets_with_and_without_think_tokens():
    assert data.format_distilled_answer(ROW, True) == "<think>1 plus 1 is 2.</think>\n\nSo \\boxed{2}"
    assert data.format_distilled_answer(ROW, False) == "1 plus 1 is 2.\n\nSo \\boxed{2}"
    stray = {**ROW, "message_thinking": "<think>hmm</think>", "message_content": "</think>ok"}
    assert data.format_distilled_answer(stray, True) == "<think>hmm</think>\n\nok"
    for thinking in (None, "", "  "):
        row = {**ROW, "message_thinking": thinking}
        assert data.format_distilled_answer(row, False) == "So \\boxed{2}"
    assert data.format_distilled_answer({"message_content": "é∑ 😀"}, False) == "é∑ 😀"


@pytest.mark.parametrize("row,reason", [
    ({k: v for k, v in ROW.items() if k != "message_content"}, "missing message_content"),
    ({**ROW, "message_content": None}, "null message_content"),
    ({**ROW, "message_content": "  "}, "empty message_content"),
    ({**ROW, "message_content": "<think></think>"}, "empty message_content"),
    ({**ROW, "message_content": 5}, "non-string message_content"),
    ({**ROW, "message_thinking": ["a"]}, "non-string message_thinking"),
    ({k: v for k, v in ROW.items() if k != "problem"}, "missing problem"),
    ({**ROW, "problem": ""}, "empty problem"),
    ("just a string", "row is not an object"),
])
def test_unusable_rows_are_counted_by_reason(tok, row, reason):
    examples, skipped = data.build_examples([ROW, row, ROW], tok, True)
    assert [e["row"] for e in examples] == [0, 2]
    assert skipped == Counter({reason: 1})


def test_sequence_layout(tok):
    (example,), _ = data.build_examples([ROW], tok, True)
    prompt_ids = tok.encode(data.render_prompt(ROW["problem"]))
    target_ids = tok.encode(data.format_distilled_answer(ROW, True), chat_wrapped=False)
    assert example["token_ids"].tolist() == prompt_ids + target_ids + [tok.eos_token_id]
    assert example["prompt_len"] == len(prompt_ids)
    input_ids, targets, mask = data.collate([example])
    n = len(example["token_ids"]) - 1
    assert (
        input_ids[0].tolist() == example["token_ids"][:-1].tolist()
        and targets[0].tolist() == example["token_ids"][1:].tolist()
    )
    assert mask[0].nonzero().squeeze(1).tolist() == list(range(len(prompt_ids) - 1, n))
    assert targets[0][mask[0]].tolist() == target_ids + [tok.eos_token_id]  # exactly the answer tokens


def test_collate_right_pads_and_masks_per_row(tok):
    examples, _ = data.build_examples([ROW, {**ROW, "message_content": "longer " * 10}], tok, False)
    input_ids, targets, mask = data.collate(examples)
    assert input_ids.shape[1] == max(len(e["token_ids"]) for e in examples) - 1
    for i, e in enumerate(examples):
        assert mask[i].sum() == len(e["token_ids"]) - e["prompt_len"]


def test_json_and_jsonl_and_errors(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([ROW, ROW]))
    (tmp_path / "a.jsonl").write_text(json.dumps(ROW) + "\n\n" + json.dumps(ROW) + "\n")
    assert (
        data.load_distill_data(tmp_path / "a.json")
        == data.load_distill_data(tmp_path / "a.jsonl")
        == [ROW, ROW]
    )
    (tmp_path / "bad.json").write_text('[{"problem": 1},\n {"problem": }]')
    with pytest.raises(ValueError, match=r"bad.json: invalid JSON at line 2 column"):
        data.load_distill_data(tmp_path / "bad.json")
    (tmp_path / "bad.jsonl").write_text(json.dumps(ROW) + "\n" + json.dumps(ROW) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"line 3 column"):
        data.load_distill_data(tmp_path / "bad.jsonl")
    (tmp_path / "obj.json").write_text('{"rows": []}')
    with pytest.raises(ValueError, match="list of rows"):
        data.load_distill_data(tmp_path / "obj.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="no rows"):
        data.load_distill_data(tmp_path / "empty.json")
    with pytest.raises(FileNotFoundError, match="partition"):
        data.load_distill_data(tmp_path / "missing.json")


def test_filter_and_split_are_deterministic_with_clear_errors():
    examples = [
        {"token_ids": [0] * n, "prompt_len": 1, "row": i} for i, n in enumerate([5, 50, 10, 3, 80, 7])
    ]
    kept, counts = data.filter_by_length(examples, 10)
    assert [e["row"] for e in kept] == [0, 2, 3, 5] and counts == {"original": 6, "kept": 4, "removed": 2}
    train, val = data.split_examples(kept, 1, seed=1)
    assert (train, val) == data.split_examples(kept, 1, seed=1)
    assert len(val) == 1 and sorted(e["row"] for e in train + val) == [0, 2, 3, 5]
    assert data.split_examples(kept, 2, seed=2) != data.split_examples(kept, 2, seed=3)
    with pytest.raises(ValueError, match="leaves no training examples"):
        data.split_examples(kept, 4, seed=1)
    stats = data.length_stats([len(e["token_ids"]) for e in examples], [e["row"] for e in examples])
    assert stats["max"] == 80 and stats["max_row"] == 4
    assert stats["min"] == 3 and stats["min_row"] == 3 and stats["median"] == 10
    answers = data.length_stats([len(e["token_ids"]) - e["prompt_len"] for e in examples])
    assert answers["average"] == pytest.approx(sum([4, 49, 9, 2, 79, 6]) / 6) and "max_row" not in answers


def test_length_aware_batches_cover_every_example_once():
    examples = [{"token_ids": [0] * n, "prompt_len": 1, "row": i} for i, n in enumerate(range(3, 203))]
    batches = data.make_batches(examples, 8, seed=0)
    assert sorted(e["row"] for b in batches for e in b) == list(range(200))
    spread = [max(len(e["token_ids"]) for e in b) - min(len(e["token_ids"]) for e in b) for b in batches]
    assert max(spread) <= 7  # sorted by length inside the window: neighbours share a batch
    budget = data.make_batches(examples, 8, seed=0, tokens_per_batch=300)
    assert all(len(b) * max(len(e["token_ids"]) for e in b) <= 300 for b in budget)
    singles = data.make_batches(examples, 1, seed=4)
    assert all(len(b) == 1 for b in singles) and singles == data.make_batches(examples, 1, seed=4)
    assert [b[0]["row"] for b in singles] != list(range(200))  # shuffled


def test_token_cache_hit_miss_and_corruption(tmp_path, tok, monkeypatch):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([ROW, {"problem": "x"}, {**ROW, "problem": "2+2?"}]))
    fresh = data.prepare_examples(path, tok, True, cache_dir=tmp_path / "c")
    plain = lambda result: ([{**e, "token_ids": e["token_ids"].tolist()} for e in result[0]], *result[1:])
    calls = []
    original = data.build_examples
    monkeypatch.setattr(data, "build_examples", lambda *a: calls.append(1) or original(*a))
    assert plain(data.prepare_examples(path, tok, True, cache_dir=tmp_path / "c")) == plain(
        fresh
    )  # hit: not rebuilt
    assert calls == []
    assert fresh[1] == Counter({"missing message_content": 1}) and fresh[2] == 3
    data.prepare_examples(path, tok, False, cache_dir=tmp_path / "c")  # other flag: miss
    data.prepare_examples(
        path, qwen3.load_tokenizer("tiny", "base"), True, cache_dir=tmp_path / "c"
    )  # other variant
    assert len(calls) == 2
    path.write_text(json.dumps([ROW]))  # changed content: miss
    assert len(data.prepare_examples(path, tok, True, cache_dir=tmp_path / "c")[0]) == 1
    assert len(calls) == 3
    for cache_file in (tmp_path / "c" / "tokenized").glob("*.pt"):
        cache_file.write_bytes(cache_file.read_bytes()[:40])  # damaged
    rebuilt = data.prepare_examples(path, tok, True, cache_dir=tmp_path / "c")
    assert plain(rebuilt)[0] == plain(original([ROW], tok, True))[0]
    assert len(calls) == 4


def test_partition_download_falls_back_to_backup_and_is_cached(tmp_path, file_server, monkeypatch):
    rows = [ROW, ROW]
    file_server.files["/backup/deepseek-r1-math500.json"] = json.dumps(rows).encode()
    monkeypatch.setattr(data, "DATA_URLS", [file_server.url + "/primary/{partition}.json",
                                            file_server.url + "/backup/{partition}.json"])
    assert data.load_distill_data("deepseek-r1-math500", cache_dir=tmp_path) == rows
    assert [p for p, _ in file_server.requests] == [
        "/primary/deepseek-r1-math500.json",
        "/backup/deepseek-r1-math500.json",
    ]
    file_server.close()
    assert (
        data.load_distill_data("deepseek-r1-math500", cache_dir=tmp_path) == rows
    )  # offline: from the cache
    with pytest.raises(qwen3.DownloadError, match="copy the file"):
        data.load_distill_data("qwen3-235b-a22b-math500", cache_dir=tmp_path)


def test_synthetic_dataset_schema_traces_and_disjoint_split():
    train, test = data.synth_dataset(300, 50, seed=7)
    assert len(train) == 300 and len(test) == 50
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}
    for row in train:
        terms = [int(t) for t in re.findall(r"\d+", row["problem"])]
        assert row["gtruth_answer"] == str(sum(terms))
        assert row["message_content"].endswith(f"\\boxed{{{sum(terms)}}}")
        lines = [[int(x) for x in re.findall(r"\d+", line)] for line in row["message_thinking"].splitlines()]
        assert lines[0] == terms and len(lines) == len(terms) and lines[-1] == [sum(terms)]
        for before, after in zip(
            lines, lines[1:]
        ):  # each line adds the first two numbers of the previous one
            assert after == [before[0] + before[1]] + before[2:]
    assert set(test[0]) == {"problem", "answer", "subject", "level", "unique_id"}
    assert data.synth_dataset(300, 50, seed=7) == (train, test)
    with pytest.raises(ValueError, match="distinct problems"):
        data.synth_dataset(10, 729, seed=7)  # 9^3 three-digit sums: none would be left for training


def test_stats_on_real_rows_with_real_tokenizer(shared_data, real_tokenizer_path, tmp_path, capsys):
    data.main(["stats", "--data_path", str(shared_data / "deepseek-r1-math-train-sample5.json"),
               "--tokenizer", str(real_tokenizer_path), "--use_think_tokens", "--max_seq_len", "1000",
               "--against", str(shared_data / "math500_test.json"), "--cache_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "rows: 5, usable: 5, skipped: none" in out
    averages = [int(x) for x in re.findall(r"average (\d+)", out)]
    assert averages[0] > averages[1] > 100  # total > answer-only
    kept = int(re.search(r"kept (\d+)", out).group(1))
    assert 0 < kept < 5


def test_synth_command_writes_both_files(tmp_path, capsys):
    data.main(["synth", "--out", str(tmp_path / "demo"), "--n_train", "20", "--n_test", "5"])
    assert len(json.loads((tmp_path / "demo" / "train.json").read_text())) == 20
    assert len(data.load_problems(tmp_path / "demo" / "test.json")) == 5


# -----------------------------------------------------------------------------
# Contamination: training problems that are MATH-500 problems, or close copies of them


def planted_rows(math500):
    """Copies of MATH-500 problems as a scraped set would have them, and problems that only look alike."""
    p12, p25, p3 = (math500[i]["problem"] for i in (12, 25, 3))
    return [
        {"problem": p12},  # 0: exact
        {"problem": p25.replace("f(x + y)", "f\\left( x+y \\right)").replace("  ", " \\, ")},  # 1: spacing
        {"problem": "For instance, 12 has the proper divisors 1, 2, 3, 4 and 6."  # 2: a sentence reworded
                    + p12[p12.index(" A proper"):]},
        {"problem": "A warm-up first: what is 2 + 2? " + p12 + " Give the answer in words."},  # 3: embedded
        {"problem": p3.replace(" ", "  ")},  # 4: a short problem, spaced out: equal once normalised
        {"problem": "How many positive divisors does 196 have?"},  # 5: short and reworded: not equal
        {"problem": "Take 284 and add up all of its divisors smaller than itself, then do the same for the "
                    "result. Which number do you get?"},  # 6: the problem of row 0, reworded throughout
        {"problem": "What is $y$? Express your answer as a common fraction."},  # 7: boilerplate
        {"problem": "Let $x,$ $y,$ and $z$ be real numbers. Express your answer as a common fraction."},  # 8
    ]


def test_planted_contamination_is_found_and_look_alikes_are_not(shared_data):
    math500 = data.read_rows(shared_data / "math500_test.json")
    found = data.contaminated(planted_rows(math500), data.Overlaps([r["problem"] for r in math500]))
    assert sorted(found) == [0, 1, 2, 3, 4]
    assert [found[i][0] for i in range(5)] == [12, 25, 12, 12, 3]  # the MATH-500 problem each one copies
    assert len(found[2][1].split()) == data.NGRAM and found[4][1] == " ".join(data.problem_words(math500[3]
                                                                                                ["problem"]))
    assert data.problem_words("$\\left( x \\right)\\!\\;+ 1$ [asy]draw((0,0));[/asy]") == ["x", "1"]


def test_checking_100000_rows_takes_seconds(shared_data):
    """Measures (prints) the check's speed; asserts only what it found."""
    math500 = data.read_rows(shared_data / "math500_test.json")
    overlaps = data.Overlaps([r["problem"] for r in math500])
    rows = [{"problem": f"{math500[i % 500]['problem']} (variant {i})"} for i in range(100_000)]
    start = time.time()
    found = data.contaminated(rows, overlaps)
    print(f"\n100,000 rows checked against MATH-500 in {time.time() - start:.2f} s")
    short = sum(len(data.problem_words(r["problem"])) < data.NGRAM for r in math500)  # found only unchanged
    assert len(found) == 100_000 - short * 200


def test_stats_reports_duplicates_wrong_answers_contamination_and_lengths(shared_data, tmp_path, capsys):
    math500 = data.read_rows(shared_data / "math500_test.json")
    rows, _ = data.synth_dataset(6, 0, seed=2)
    rows[2] = {**rows[1], "problem": rows[1]["problem"].replace(" ", "  ")}  # the same problem and answer
    rows[3] = {**rows[0], "message_content": "So \\boxed{0}."}  # the same problem, a wrong answer
    rows.append({**rows[4], "problem": math500[12]["problem"]})  # a MATH-500 problem
    (tmp_path / "t.json").write_text(json.dumps(rows))
    data.main(["stats", "--data_path", str(tmp_path / "t.json"), "--tokenizer", "tiny",
               "--max_seq_len", "200",
               "--against", str(shared_data / "math500_test.json"), "--cache_dir", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert "duplicates: 2 rows repeat an earlier problem (after normalisation), 1 with the same final " \
           "answer too (rows 2)" in out
    assert "teacher answers: 1 of 7 graded wrong against gtruth_answer (rows 3)" in out
    assert "contaminated: 1 rows share a 10-word run with" in out and "row 6: 'the proper divisors" in out
    assert re.search(r"max_seq_len 200: original 7, kept 6, removed 1 \(rows 6\)", out)
