"""
Charts: loss curves of training runs, accuracy of evaluations (error bars, protocol), answer lengths,
accuracy against training time.

    python plot.py loss out/metrics.csv --out loss.png
    python plot.py loss runA/metrics.csv runB/metrics.csv --labels A B --out compare.png
    python plot.py accuracy base.summary.json distilled.summary.json --out accuracy.png
    python plot.py lengths distilled.jsonl --out lengths.png
    python plot.py progress runA/*.summary.json runB/*.summary.json --out progress.png
"""
import csv
import json
from pathlib import Path

import common
import evaluate
import qwen3


def read_metrics(path):
    """(step rows, epoch spans) from a metrics CSV. The last row of each epoch is its summary row
    (its train_loss is the epoch mean), so it stays out of the train curve."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"epoch", "total_steps", "train_loss", "val_loss"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{path}: not a metrics CSV (missing columns {sorted(missing)})")
    rows = [{k: float(r[k]) for k in ("epoch", "total_steps", "train_loss", "val_loss")} for r in rows]
    last_of_epoch = {int(r["epoch"]): i for i, r in enumerate(rows)}
    steps = [r for i, r in enumerate(rows) if i not in last_of_epoch.values()]
    spans, start = [], 0
    for epoch, i in sorted(last_of_epoch.items()):
        spans.append((epoch, start, rows[i]["total_steps"]))
        start = rows[i]["total_steps"]
    return rows, steps, spans


def plot_losses(paths, labels, out, show):
    import matplotlib.pyplot as plt  # imported where used: the scripts that import plot need no display
    fig, ax = plt.subplots(figsize=(8, 4.5))
    spans = None
    for n, (path, label) in enumerate(zip(paths, labels)):
        rows, steps, run_spans = read_metrics(path)
        color = f"C{n}"
        ax.plot([r["total_steps"] for r in steps], [r["train_loss"] for r in steps], color=color, alpha=0.3,
                linewidth=1, label=f"{label} train")
        ax.plot([r["total_steps"] for r in rows], [r["val_loss"] for r in rows], color=color, linewidth=2,
                label=f"{label} validation")
        spans = spans or run_spans
    ax.set_xlabel("Total steps")
    ax.set_ylabel("Loss (answer tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    # a second axis below the first: each epoch's name centred under its span of steps
    epochs = ax.twiny()
    epochs.set_xlim(ax.get_xlim())
    epochs.xaxis.set_ticks_position("bottom")
    epochs.xaxis.set_label_position("bottom")
    epochs.spines["bottom"].set_position(("outward", 40))
    epochs.set_xticks([(a + b) / 2 for _, a, b in spans], [f"Epoch {e}" for e, _, _ in spans])
    epochs.set_xticks([b for _, _, b in spans[:-1]], minor=True)
    epochs.tick_params(axis="x", which="major", length=0)
    epochs.tick_params(axis="x", which="minor", length=8)
    fig.tight_layout()
    return save(fig, out, show)


def read_summary(path):
    summary = json.loads(Path(path).read_text())
    if "accuracy" not in summary:
        raise ValueError(f"{path}: not a complete evaluate.py summary (no 'accuracy')")
    return summary


def plot_accuracy(paths, labels, out, show):
    """Overall accuracy (pass@1) with its 95% interval, each bar labelled with its protocol; per subject (or
    per level where all problems share one subject)."""
    import matplotlib.pyplot as plt
    summaries = [read_summary(p) for p in paths]
    key = "by_subject" if len({k for s in summaries for k in s.get("by_subject", {})}) > 1 else "by_level"
    groups = sorted({k for s in summaries for k in s.get(key, {})})
    fig, (overall, per_group) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1, 2.5]})
    for n, (s, label) in enumerate(zip(summaries, labels)):
        acc, (low, high) = 100 * s["accuracy"], s.get("ci95", [s["accuracy"]] * 2)
        overall.bar(n, acc, color=f"C{n}", yerr=[[acc - 100 * low], [100 * high - acc]], capsize=4)
        overall.text(n, 100 * high + 1, f"{acc:.1f}%", ha="center", va="bottom")
        width = 0.8 / len(summaries)
        protocol = evaluate.describe_protocol(s.get("protocol", {}))
        per_group.bar([k + (n - (len(summaries) - 1) / 2) * width for k in range(len(groups))],
                      [100 * s.get(key, {}).get(g, {}).get("accuracy", 0) for g in groups],
                      width, color=f"C{n}", label=f"{label}: {protocol}")
    overall.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    overall.set_ylabel("Accuracy, pass@1 (%), with 95% CI")
    overall.set_ylim(0, 108)
    overall.set_title("Overall")
    per_group.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    per_group.set_ylim(0, 105)
    per_group.set_title("By subject" if key == "by_subject" else "By level")
    # the protocol beside each run: a greedy and a sampled accuracy are different measurements
    per_group.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15))
    for axis in (overall, per_group):
        axis.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save(fig, out, show)


def plot_lengths(paths, labels, out, show):
    """Distribution of answer lengths, correct and wrong apart, the cap marked: answers that pile up at the
    cap (often in a loop) are what a longer budget or sampling could change."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(paths), figsize=(6 * len(paths), 4), squeeze=False)
    for ax, path, label in zip(axes[0], paths, labels):
        records = evaluate.read_records(path)
        if not records or "num_tokens" not in records[0]:
            raise ValueError(f"{path}: not evaluate.py generate records (no 'num_tokens')")
        summary_path = evaluate.summary_path_of(Path(path))
        cap = max(r["num_tokens"] for r in records)
        if summary_path.exists():
            cap = json.loads(summary_path.read_text())["protocol"].get("max_new_tokens", cap)
        bins = [i * cap / 30 for i in range(31)]
        for correct, color in ((True, "C2"), (False, "C3")):
            ax.hist([r["num_tokens"] for r in records if r["correct"] == correct], bins=bins, color=color,
                    alpha=0.6, label="correct" if correct else "wrong")
        ax.axvline(cap, color="black", linestyle="--", linewidth=1, label=f"cap ({cap} tokens)")
        looped = sum(r.get("looped", False) for r in records)
        ax.set_title(f"{label}: {len(records)} answers, {looped} end in a loop")
        ax.set_xlabel("Answer length (tokens)")
        ax.set_ylabel("Answers")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save(fig, out, show)


def plot_progress(paths, labels, out, show, start=None):
    """Accuracy against training time: each file is the evaluation of one train.py checkpoint, which records
    its training seconds. The checkpoints of one run directory make a line; files with the same label share a
    colour (an arm's seeds). start: the evaluation of the checkpoint the runs began from, at 0 s."""
    import matplotlib.pyplot as plt
    runs = progress_points(paths, labels)
    first = [(0.0, 100 * read_summary(start)["accuracy"])] if start else []
    colors = {label: f"C{n}" for n, label in enumerate(dict.fromkeys(label for label, _ in runs))}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    named = set()  # one legend entry a label
    for (label, run), points in runs.items():
        ax.plot(*zip(*first, *sorted(points)), marker="o", markersize=4, color=colors[label], alpha=0.8,
                label=None if label in named else label)
        named.add(label)
    ax.set_xlabel("Training time (s)")
    ax.set_ylabel("Accuracy, pass@1 (%)")
    protocol = evaluate.describe_protocol(read_summary(paths[0]).get("protocol", {}))
    ax.set_title(f"Accuracy during training ({protocol})", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save(fig, out, show)


def progress_points(paths, labels=None):
    """{(label, run directory): [(training seconds, accuracy %)]}; default label: the run directory's name."""
    runs = {}
    for path, label in zip(paths, labels or [None] * len(paths)):
        summary = read_summary(path)
        seconds, run = training_time(summary, path)
        runs.setdefault((label or run.name, run), []).append((seconds, 100 * summary["accuracy"]))
    return runs


def training_time(summary, path):
    """(training seconds, run directory) of the checkpoint an evaluate.py summary graded."""
    checkpoint = Path(summary.get("protocol", {}).get("model", ""))
    try:
        seconds = qwen3.read_checkpoint(checkpoint, mmap=True).get("elapsed_s")
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"{path}: it graded {checkpoint}, not a train.py checkpoint here ({err})") from None
    if seconds is None:
        raise ValueError(f"{path}: checkpoint {checkpoint} does not record its training time (written by an "
                         "older train.py)")
    return seconds, checkpoint if checkpoint.is_dir() else checkpoint.parent


def save(fig, out, show):
    import matplotlib.pyplot as plt
    fig.savefig(out, dpi=150)
    print(f"wrote {out}")
    if show:
        plt.show()
    plt.close(fig)


def parse_args(argv=None):
    p, sub = common.parser(__doc__, default="the kind of chart its files call for (metrics CSVs: loss)",
                           loss="loss curves from metrics CSVs (train.py's or the reference's)",
                           accuracy="accuracy bars from evaluate.py summaries",
                           lengths="answer-length histograms from evaluate.py records",
                           progress="accuracy against training time from evaluations of checkpoints")
    inputs = {"loss": "metrics CSVs", "accuracy": "OUT.summary.json files", "lengths": "OUT.jsonl files",
              "progress": "OUT.summary.json files of train.py checkpoints (evaluate.py --checkpoint_path)"}
    for name, s in sub.items():
        s.add_argument("paths", nargs="+", help=inputs[name])
        s.add_argument("--labels", nargs="+", help="legend labels, one per file (default: "
                       + ("run directories)" if name == "progress" else "file names)"))
        s.add_argument("--out", default=f"{name}.png", help="image file")
        s.add_argument("--show", action="store_true", help="also open a window (needs a display)")
    sub["progress"].add_argument("--start", help="the summary of the checkpoint the runs began from (0 s)")
    return p.parse_args(common.with_command(argv, sub, chart_for))


def chart_for(argv):
    """The chart a command line without one asks for, from its first file: `plot.py metrics.csv` is loss
    curves, summaries an accuracy chart, records a length histogram."""
    first = argv[0] if argv else ""
    if first.endswith(".summary.json"):
        return "accuracy"
    return "lengths" if first.endswith(".jsonl") else "loss"


def main(argv=None):
    args = parse_args(argv)
    if args.labels and len(args.labels) != len(args.paths):
        raise ValueError(f"{len(args.labels)} labels for {len(args.paths)} files")
    for path in args.paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"not found: {path}")
    labels = args.labels or [Path(x).parent.name if Path(x).stem == "metrics" else
                             Path(x).stem.replace(".summary", "") for x in args.paths]
    import matplotlib
    if not args.show:
        matplotlib.use("Agg")  # headless by default
    if args.cmd == "progress":  # default labels: the run directories
        return plot_progress(args.paths, args.labels, args.out, args.show, args.start)
    plot = {"loss": plot_losses, "accuracy": plot_accuracy, "lengths": plot_lengths}[args.cmd]
    plot(args.paths, labels, args.out, args.show)


if __name__ == "__main__":
    common.run(main)
