"""
Loss curves of training runs (train.py's metrics.csv or the reference logs) and accuracy charts of evaluations.

    python plot.py out/metrics.csv --out loss.png
    python plot.py runA/metrics.csv runB/metrics.csv --labels A B --out compare.png
    python plot.py --accuracy base.summary.json distilled.summary.json --out accuracy.png
"""
import argparse
import csv
import json
import sys
from pathlib import Path


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
    import matplotlib.pyplot as plt
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


def plot_accuracy(paths, labels, out, show):
    import matplotlib.pyplot as plt
    summaries = [json.loads(Path(p).read_text()) for p in paths]
    for p, s in zip(paths, summaries):
        if "accuracy" not in s:
            raise ValueError(f"{p}: not an evaluate.py summary (no 'accuracy')")
    # per subject (MATH-500 has seven); per level where all problems share one subject
    key = "by_subject" if len({k for s in summaries for k in s.get("by_subject", {})}) > 1 else "by_level"
    subjects = sorted({k for s in summaries for k in s.get(key, {})})
    fig, (overall, per_subject) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 3]})
    for n, (s, label) in enumerate(zip(summaries, labels)):
        acc, (low, high) = 100 * s["accuracy"], s.get("ci95", [s["accuracy"]] * 2)
        overall.bar(n, acc, color=f"C{n}", yerr=[[acc - 100 * low], [100 * high - acc]], capsize=4)
        overall.text(n, 100 * high + 1, f"{acc:.1f}%", ha="center", va="bottom")
        width = 0.8 / len(summaries)
        per_subject.bar([k + (n - (len(summaries) - 1) / 2) * width for k in range(len(subjects))],
                        [100 * s.get(key, {}).get(sub, {}).get("accuracy", 0) for sub in subjects],
                        width, color=f"C{n}", label=label)
    overall.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    overall.set_ylabel("Accuracy (%), 95% CI")
    overall.set_ylim(0, 105)
    overall.set_title("Overall")
    per_subject.set_xticks(range(len(subjects)), subjects, rotation=20, ha="right")
    per_subject.set_ylim(0, 105)
    per_subject.set_title("By subject" if key == "by_subject" else "By level")
    per_subject.legend()
    for axis in (overall, per_subject):
        axis.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save(fig, out, show)


def save(fig, out, show):
    import matplotlib.pyplot as plt
    fig.savefig(out, dpi=150)
    print(f"wrote {out}")
    if show:
        plt.show()
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("paths", nargs="+", help="metrics CSVs (loss curves) or, with --accuracy, evaluate.py summary JSONs")
    p.add_argument("--accuracy", action="store_true", help="bar chart of accuracies (with 95%% CI, per subject or level)")
    p.add_argument("--labels", nargs="+", help="legend labels, one per file (default: file names)")
    p.add_argument("--out", default=None, help="image file (default: loss.png, or accuracy.png with --accuracy)")
    p.add_argument("--show", action="store_true", help="also open a window (needs a display)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.labels and len(args.labels) != len(args.paths):
        raise ValueError(f"{len(args.labels)} labels for {len(args.paths)} files")
    for path in args.paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"not found: {path}")
    labels = args.labels or [Path(x).stem.replace(".summary", "") if Path(x).stem != "metrics" else Path(x).parent.name
                             for x in args.paths]
    import matplotlib
    if not args.show:
        matplotlib.use("Agg")  # headless by default
    if args.accuracy:
        plot_accuracy(args.paths, labels, args.out or "accuracy.png", args.show)
    else:
        plot_losses(args.paths, labels, args.out or "loss.png", args.show)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as err:
        sys.exit(f"error: {err}")
