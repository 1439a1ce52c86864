import csv
import json

import pytest

import plot
import qwen3


def test_reference_logs_render_and_summary_rows_stay_out_of_the_train_curve(shared_data, tmp_path):
    path = shared_data / "deepseek-r1-2048_distill_metrics.csv"
    rows, steps, spans = plot.read_metrics(path)
    assert len(rows) == 403 and len(steps) == 400  # three end-of-epoch rows (epoch means) are left out
    assert spans == [(1, 0, 6682.0), (2, 6682.0, 13364.0), (3, 13364.0, 20046.0)]
    plot.main(
        [
            "loss",
            str(path),
            str(shared_data / "qwen3-235b-a22-b-2048_distill_metrics.csv"),
            "--labels",
            "R1",
            "235B",
            "--out",
            str(tmp_path / "ref.png"),
        ]
    )
    assert (tmp_path / "ref.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_own_csv_with_extra_columns(tmp_path):
    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "total_steps", "train_loss", "val_loss", "lr", "tokens_per_sec", "elapsed_s"])
        w.writerows(
            [
                [1, 2, 3.0, 2.5, 1e-3, 100, 1],
                [1, 4, 2.0, 1.5, 1e-3, 100, 2],
                [1, 4, 2.5, 1.5, 1e-3, 100, 2],
                [2, 6, 1.0, 1.2, 1e-3, 100, 3],
                [2, 8, 0.8, 1.0, 1e-3, 100, 4],
                [2, 8, 0.9, 1.0, 1e-3, 100, 4],
            ]
        )
    rows, steps, spans = plot.read_metrics(path)
    assert [r["train_loss"] for r in steps] == [3.0, 2.0, 1.0, 0.8] and spans == [(1, 0, 4.0), (2, 4.0, 8.0)]
    plot.main(["loss", str(path), "--out", str(tmp_path / "loss.png")])
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    plot.main([str(path), "--out", str(tmp_path / "old.png")])  # the form before subcommands: a CSV is loss
    assert (tmp_path / "old.png").read_bytes() == (tmp_path / "loss.png").read_bytes()


def test_accuracy_chart(tmp_path):
    for name, acc in (("before", 0.1), ("after", 0.6)):
        (tmp_path / f"{name}.summary.json").write_text(
            json.dumps(
                {
                    "accuracy": acc,
                    "num_correct": int(acc * 10),
                    "num_examples": 10,
                    "ci95": [acc / 2, min(1, acc * 1.5)],
                    "by_subject": {"Algebra": {"accuracy": acc}, "Geometry": {"accuracy": acc / 2}},
                }
            )
        )
    plot.main(["accuracy", str(tmp_path / "before.summary.json"), str(tmp_path / "after.summary.json"),
               "--out", str(tmp_path / "acc.png")])
    assert (tmp_path / "acc.png").stat().st_size > 10_000
    plot.main([str(tmp_path / "before.summary.json"), str(tmp_path / "after.summary.json"), "--out",
               str(tmp_path / "old.png")])  # without a command: summaries mean the accuracy chart
    assert (tmp_path / "old.png").read_bytes() == (tmp_path / "acc.png").read_bytes()


def test_bad_input(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a metrics CSV"):
        plot.main(["loss", str(tmp_path / "x.csv"), "--out", str(tmp_path / "x.png")])
    with pytest.raises(FileNotFoundError):
        plot.main(["loss", str(tmp_path / "nope.csv")])
    with pytest.raises(ValueError, match="2 labels for 1 files"):
        plot.main(["loss", str(tmp_path / "x.csv"), "--labels", "a", "b"])
    with pytest.raises(ValueError, match="not a complete evaluate.py summary"):
        (tmp_path / "partial.summary.json").write_text('{"protocol": {}, "complete": false}')
        plot.main(["accuracy", str(tmp_path / "partial.summary.json"), "--out", str(tmp_path / "a.png")])


def test_length_chart_marks_the_cap(tmp_path):
    records = [{"index": i, "sample": 0, "num_tokens": n, "correct": n < 60, "looped": n == 64}
               for i, n in enumerate([20, 35, 64, 64, 50])]
    (tmp_path / "run.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "run.summary.json").write_text(json.dumps({"protocol": {"max_new_tokens": 64}}))
    plot.main(
        [
            "lengths",
            str(tmp_path / "run.jsonl"),
            str(tmp_path / "run.jsonl"),
            "--out",
            str(tmp_path / "l.png"),
        ]
    )
    assert (tmp_path / "l.png").stat().st_size > 10_000
    (tmp_path / "bad.jsonl").write_text(json.dumps({"index": 0}) + "\n")
    with pytest.raises(ValueError, match="not evaluate.py generate records"):
        plot.main(["lengths", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "b.png")])


def test_progress_chart_places_each_checkpoint_at_its_training_time(tmp_path):
    model, tok = qwen3.load_model("tiny"), qwen3.load_tokenizer("tiny", "base")
    summaries = []
    for run, seconds, acc in [("hard-1", 30.0, 0.5), ("hard-1", 60.0, 0.6), ("hard-2", 31.0, 0.4),
                              ("onpolicy-1", 29.0, 0.3)]:
        checkpoint = qwen3.save_checkpoint(tmp_path / run / f"t{seconds:.0f}.pth", model, tok,
                                           elapsed_s=seconds)
        summary = tmp_path / run / f"t{seconds:.0f}.summary.json"
        summary.write_text(json.dumps({"accuracy": acc, "protocol": {"model": str(checkpoint)}}))
        summaries.append(str(summary))
    labels = ["hard", "hard", "hard", "on-policy"]
    assert plot.progress_points(summaries, labels) == {
        ("hard", tmp_path / "hard-1"): [(30.0, 50.0), (60.0, 60.0)],
        ("hard", tmp_path / "hard-2"): [(31.0, 40.0)], ("on-policy", tmp_path / "onpolicy-1"): [(29.0, 30.0)]}
    assert [label for label, _ in plot.progress_points(summaries[2:])] == ["hard-2", "onpolicy-1"]
    plot.main(["progress", *summaries, "--labels", *labels, "--start", summaries[0], "--out",
               str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").stat().st_size > 10_000
    qwen3.save_checkpoint(tmp_path / "old.pth", model, tok)  # from before checkpoints kept their time
    for name, model_name in [("old", str(tmp_path / "old.pth")), ("api", "m at http://127.0.0.1:1/v1")]:
        summary = {"accuracy": 1, "protocol": {"model": model_name}}
        (tmp_path / f"{name}.summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="does not record its training time"):
        plot.main(["progress", str(tmp_path / "old.summary.json")])
    with pytest.raises(ValueError, match="not a train.py checkpoint here"):
        plot.main(["progress", str(tmp_path / "api.summary.json")])
