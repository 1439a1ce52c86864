"""
Teacher data: load, format, tokenize (cached), filter, split, batch; its overlap with the evaluation set; the
offline synthetic dataset. (The teacher-logits command writes a teacher's top-k log-probs: teacher.py.)

    python data.py stats --data_path deepseek-r1-math-train --use_think_tokens --max_seq_len 2048
    python data.py synth --out demo
    python data.py teacher-logits --teacher Qwen/Qwen3-4B --use_think_tokens --out r1-top64.pt
"""
import hashlib
import json
import random
import re
import sys
from array import array
from collections import Counter
from pathlib import Path

import torch

import checker
import common
import qwen3

PARTITIONS = ["deepseek-r1-math-train", "deepseek-r1-math500", "qwen3-235b-a22b-math-train",
              "qwen3-235b-a22b-math500"]
DATA_URLS = ["https://huggingface.co/datasets/rasbt/math_distill/resolve/main/data/{partition}.json",
             "https://f001.backblazeb2.com/file/reasoning-from-scratch/MATH/{partition}.json"]
MATH500_URL = ("https://raw.githubusercontent.com/rasbt/reasoning-from-scratch/main/"
               "ch03/01_main-chapter-code/math500_test.json")
# problems to ask a teacher about, by name: MATH-500, and the 12,000 MATH problems outside it (the reference's
# training problems; rows: problem, answer, level, type, unique_id)
PROBLEM_SETS = {"math500": ("math500_test.json", MATH500_URL),
                "math-train": ("math_full_minus_math500.json", "https://raw.githubusercontent.com/rasbt/"
                               "math_full_minus_math500/refs/heads/main/math_full_minus_math500.json")}
FORMAT_VERSION = 1  # bump when formatting or tokenization changes: old token caches then miss

PROMPT_TEMPLATE = ("You are a helpful math assistant.\n"
                   "Answer the question and write the final result on a new line as:\n"
                   "\\boxed{ANSWER}\n\n"
                   "Question:\n{problem}\n\nAnswer:")

# -----------------------------------------------------------------------------
# Loading


def fetch(urls, dest, download=True):
    """Download the first URL that works into dest (cached: no network once it exists). download=False: the
    cached file or None."""
    if dest.exists() or not download:
        return dest if dest.exists() else None
    errors = []
    for url in urls:
        try:
            return qwen3.download(url, dest)
        except qwen3.DownloadError as e:
            errors.append(str(e).splitlines()[0])
    raise qwen3.DownloadError(f"could not download {dest.name} ({'; '.join(errors)}). Without internet, copy "
                              f"the file to {dest} or pass a local path.")


def resolve_data_path(partition_or_path, cache_dir=None, download=True):
    """A local file for a partition name or a problem set (downloaded once, primary URL then backup) or a
    path. download=False: a name not downloaded yet is None."""
    data_dir = Path(cache_dir or qwen3.default_cache_dir()) / "data"
    if partition_or_path in PARTITIONS:
        dest = data_dir / f"{partition_or_path}.json"
        return fetch([u.format(partition=partition_or_path) for u in DATA_URLS], dest, download)
    if partition_or_path in PROBLEM_SETS:  # problems without teacher text: on-policy training
        file, url = PROBLEM_SETS[partition_or_path]
        return fetch([url], data_dir / file, download)
    path = Path(partition_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path} (or use a partition: {', '.join(PARTITIONS)}; "
                                f"or a problem set: {', '.join(PROBLEM_SETS)})")
    return path


def read_rows(path):
    """Rows of a JSON array or a JSON Lines file, with errors that name the file, line and column."""
    text = Path(path).read_text(encoding="utf-8")
    rows = None
    if Path(path).suffix != ".jsonl":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data": several JSON values, i.e. JSON Lines
                raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: "
                                 f"{e.msg}") from None
    if rows is None:
        rows = []
        for line_no, line in enumerate(text.splitlines(), 1):
            try:
                if line.strip():
                    rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON at line {line_no} column {e.colno}: "
                                 f"{e.msg}") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of rows at the top level, got {type(rows).__name__}")
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def load_distill_data(partition_or_path, cache_dir=None):
    return read_rows(resolve_data_path(partition_or_path, cache_dir))


def load_problems(name_or_path=None, cache_dir=None):
    """Problems to answer: a set by name (PROBLEM_SETS; default MATH-500), downloaded and cached, or a local
    JSON/JSONL file. Each row needs a 'problem' string and an 'answer' (or the teacher files' 'gtruth_answer',
    which becomes 'answer')."""
    name_or_path = name_or_path or "math500"
    rows = read_rows(resolve_data_path(name_or_path, cache_dir))
    for n, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("problem"), str) or \
                not ("answer" in row or "gtruth_answer" in row):
            raise ValueError(f"{name_or_path}: row {n} lacks a 'problem' string or an 'answer' (or "
                             "'gtruth_answer')")
        row.setdefault("answer", row.get("gtruth_answer"))
    return rows


# -----------------------------------------------------------------------------
# Formatting


def render_prompt(problem, template=PROMPT_TEMPLATE):
    """The prompt for a problem: the template with {problem} replaced (its other braces are text)."""
    return template.replace("{problem}", problem)


def _field(row, key, required):
    """A stripped string field, or ValueError naming why the row is unusable."""
    if not isinstance(row, dict):
        raise ValueError("row is not an object")
    if key not in row:
        if required:
            raise ValueError(f"missing {key}")
        return ""
    value = row[key]
    if value is None:
        if required:
            raise ValueError(f"null {key}")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"non-string {key}")
    return value.replace("<think>", "").replace("</think>", "").strip()


def format_distilled_answer(row, use_think_tokens):
    """The training target for one teacher row; ValueError (the skip reason) when unusable."""
    content = _field(row, "message_content", required=True)
    if not content:
        raise ValueError("empty message_content")
    thinking = _field(row, "message_thinking", required=False)
    if use_think_tokens:
        return f"<think>{thinking}</think>\n\n{content}"
    return f"{thinking}\n\n{content}" if thinking else content


def format_example(row, use_think_tokens):
    """(prompt, target) strings; ValueError with the skip reason."""
    problem = _field(row, "problem", required=True)
    if not problem:
        raise ValueError("empty problem")
    return render_prompt(problem), format_distilled_answer(row, use_think_tokens)


def build_examples(rows, tokenizer, use_think_tokens, prompts_only=False):
    """Examples {token_ids: prompt ids + target ids + [eos] (an int32 tensor), prompt_len} and a Counter of
    skip reasons.

    Index i of a skipped row is simply absent; each example keeps its row index in 'row'. prompts_only: a row
    without teacher text (a problem to answer on-policy) is kept with an empty target (see has_teacher_text).
    """
    texts, skipped = [], Counter()
    for i, row in enumerate(rows):
        try:
            texts.append((i, *format_example(row, use_think_tokens)))
        except ValueError as reason:
            if prompts_only and isinstance(row, dict) and _field(row, "problem", required=False):
                texts.append((i, render_prompt(_field(row, "problem", required=True)), None))
            else:
                skipped[str(reason)] += 1
    prompts = tokenizer.encode_batch([tokenizer.wrap(p) for _, p, _ in texts])
    targets, bar = [], qwen3.Progress(len(texts), "tokenize", unit="rows")
    for s in range(0, len(texts), 256):  # chunks: a progress bar, and faster than one huge batch
        targets += tokenizer.encode_batch([t or "" for _, _, t in texts[s:s + 256]])
        bar.update(len(texts[s:s + 256]))
    bar.close()
    # int32 tensors, not lists of Python ints: a twentieth of the memory, and the token cache loads as views
    # (through an array: torch.tensor(list) converts int by int)
    examples = [{"token_ids": torch.frombuffer(array("i", p + t + [tokenizer.eos_token_id]),
                                               dtype=torch.int32), "prompt_len": len(p), "row": i}
                for (i, _, _), p, t in zip(texts, prompts, targets)]
    return examples, skipped


def has_teacher_text(example):
    """False for a prompt kept without teacher text (its target is the eos alone)."""
    return len(example["token_ids"]) > example["prompt_len"] + 1


def examples_key(path, tokenizer, use_think_tokens, prompts_only=False):
    """What the tokenized examples of a file depend on: its content, the tokenizer and its variant, the think
    flag and the format version. Files derived from them (token cache, teacher logits) carry this key."""
    parts = [hashlib.sha256(Path(path).read_bytes()).hexdigest(), tokenizer.sha256, tokenizer.kind,
             str(bool(use_think_tokens)), str(FORMAT_VERSION)] + (["prompts"] if prompts_only else [])
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def prepare_examples(data_path, tokenizer, use_think_tokens, cache_dir=None, prompts_only=False):
    """build_examples for a file, cached on disk under its examples_key.

    Returns (examples, skipped, num_rows). A cache file whose key or structure is wrong is rebuilt.
    """
    path = resolve_data_path(data_path, cache_dir)
    key = examples_key(path, tokenizer, use_think_tokens, prompts_only)
    cache_file = Path(cache_dir or qwen3.default_cache_dir()) / "tokenized" / f"{path.stem}-{key}.pt"
    if cache_file.exists():
        cached = _read_token_cache(cache_file, key)
        if cached is not None:
            return cached
    rows = read_rows(path)
    examples, skipped = build_examples(rows, tokenizer, use_think_tokens, prompts_only)
    _write_token_cache(cache_file, key, examples, skipped, len(rows))
    return examples, skipped, len(rows)


def _write_token_cache(cache_file, key, examples, skipped, num_rows):
    lengths = torch.tensor([len(e["token_ids"]) for e in examples], dtype=torch.int64)
    state = {"key": key, "num_rows": num_rows, "skipped": dict(skipped),
             "tokens": torch.cat([e["token_ids"] for e in examples]) if examples else
             torch.zeros(0, dtype=torch.int32), "lengths": lengths,
             "prompt_lens": torch.tensor([e["prompt_len"] for e in examples], dtype=torch.int64),
             "rows": torch.tensor([e["row"] for e in examples], dtype=torch.int64)}
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    qwen3.save_atomically(cache_file, lambda tmp: torch.save(state, tmp))


def _read_token_cache(cache_file, key):
    """The cached (examples, skipped, num_rows), or None when the file is stale or damaged."""
    try:
        state = torch.load(cache_file, weights_only=True)
        lengths = state["lengths"].tolist()
        ok = state["key"] == key and sum(lengths) == len(state["tokens"]) == state["tokens"].numel() \
            and len(lengths) == len(state["prompt_lens"]) == len(state["rows"])
    except Exception:
        ok = False
    if not ok:
        print(f"token cache {cache_file} is stale or damaged: rebuilding", file=sys.stderr)
        return None
    chunks = torch.split(state["tokens"], lengths)
    examples = [{"token_ids": c, "prompt_len": p, "row": r}
                for c, p, r in zip(chunks, state["prompt_lens"].tolist(), state["rows"].tolist())]
    return examples, Counter(state["skipped"]), state["num_rows"]


# -----------------------------------------------------------------------------
# Statistics, length filter, split


def length_stats(lengths, rows=None):
    """Average, median, shortest and longest of some lengths; with each length's data row, also the rows of
    the shortest and the longest."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    stats = {"average": sum(lengths) / len(lengths), "median": lengths[order[len(order) // 2]],
             "min": lengths[order[0]], "max": lengths[order[-1]]}
    return {**stats, "min_row": rows[order[0]], "max_row": rows[order[-1]]} if rows else stats


# -----------------------------------------------------------------------------
# Contamination: training problems that are evaluation problems, or close copies of them. A row is
# contaminated when its problem shares a run of NGRAM words with a problem of the evaluation set (a problem
# shorter than that: when the two are equal), both read by problem_words. NGRAM is measured: see the README.

NGRAM = 10
RE_ASY = re.compile(r"\[asy\].*?\[/asy\]", re.S)  # diagrams: code, much of it shared
RE_LATEX_SPACING = re.compile(r"\\(?:left|right|q?quad)(?![a-z])|\\[!,;: ]|~")
RE_PROBLEM_WORD = re.compile(r"\\[a-z]+|[a-z]+|\d+(?:\.\d+)?")


def problem_words(problem):
    """A problem's words for telling whether two problems are one: lower case, without diagrams, \\left,
    \\right and LaTeX spacing; words, numbers and LaTeX commands kept, punctuation and math symbols dropped
    (so that spacing and markup do not tell two copies apart)."""
    return RE_PROBLEM_WORD.findall(RE_LATEX_SPACING.sub(" ", RE_ASY.sub(" ", problem).lower()))


class Overlaps:
    """An index of an evaluation set's problems (each run of n words, and each problem whole), to find the
    problems that overlap one of them: 100,000 are checked in seconds."""

    def __init__(self, problems, n=NGRAM):
        self.n, self.runs, self.whole = n, {}, {}
        for i, problem in enumerate(problems):
            words = tuple(problem_words(problem))
            if words:
                self.whole.setdefault(words, i)
            for j in range(len(words) - n + 1):
                self.runs.setdefault(words[j:j + n], i)

    def find(self, problem):
        """(index of the evaluation problem, the words shared) for a problem overlapping one, else None."""
        words = tuple(problem_words(problem))
        if words in self.whole:
            return self.whole[words], " ".join(words)
        for j in range(len(words) - self.n + 1):
            if words[j:j + self.n] in self.runs:
                return self.runs[words[j:j + self.n]], " ".join(words[j:j + self.n])
        return None


def evaluation_overlaps(against, cache_dir=None, n=NGRAM, download=True):
    """Overlaps for an evaluation set: a set by name (download=False: None if not downloaded yet) or a
    JSON/JSONL file of rows with a 'problem'."""
    path = resolve_data_path(against, cache_dir, download)
    if path is None:
        return None
    problems = [row.get("problem") if isinstance(row, dict) else None for row in read_rows(path)]
    if not all(isinstance(p, str) for p in problems):
        raise ValueError(f"{against}: every row of an evaluation set needs a 'problem' string")
    return Overlaps(problems, n)


def contaminated(rows, overlaps):
    """{row index: (evaluation problem index, shared words)} for the rows whose problem overlaps the set."""
    found = {}
    for i, row in enumerate(rows):
        problem = row.get("problem") if isinstance(row, dict) else None
        hit = overlaps.find(problem) if isinstance(problem, str) else None
        if hit:
            found[i] = hit
    return found


def describe_contaminated(found, against, n=NGRAM, shown=3):
    """One line: how many rows overlap the evaluation set, the first few with what they share."""
    if not found:
        return f"none share a {n}-word run with {against}"
    first = "; ".join(f"row {i}: '{words[:60]}' ({against} problem {j})" for i, (j, words) in
                      list(found.items())[:shown])
    more = "; ..." if len(found) > shown else ""
    return f"{len(found)} rows share a {n}-word run with {against} ({first}{more})"


def filter_by_length(examples, max_seq_len):
    """Examples of at most max_seq_len tokens (eos included) and the counts."""
    kept = [e for e in examples if len(e["token_ids"]) <= max_seq_len]
    return kept, {"original": len(examples), "kept": len(kept), "removed": len(examples) - len(kept)}


def split_examples(examples, validation_size, seed):
    """Seeded shuffle, then the first validation_size examples are the validation set."""
    if validation_size < 0:
        raise ValueError(f"validation size must be >= 0, got {validation_size}")
    if validation_size >= len(examples):
        raise ValueError(f"validation size {validation_size} leaves no training examples: only "
                         f"{len(examples)} examples remain after filtering (lower --validation_size or raise "
                         "--max_seq_len)")
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    return shuffled[validation_size:], shuffled[:validation_size]


def make_batches(examples, batch_size, seed, tokens_per_batch=0, group=1):
    """Seeded shuffle into batches of similar length (right padding then wastes little compute).

    batch_size 1 with no token budget is the reference per-example order. Otherwise examples are sorted
    by length within windows of 100 batches, cut into batches of at most batch_size examples and at most
    tokens_per_batch padded tokens (when > 0), and the batches are shuffled in runs of `group` neighbours:
    the micro-batches of one optimizer step, shared by several processes, then take about as long.
    """
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    if batch_size == 1 and not tokens_per_batch and group == 1:
        return [[examples[i]] for i in order]
    window, batches = batch_size * 100, []
    for w in range(0, len(order), window):
        batch = []
        for i in sorted(order[w:w + window], key=lambda i: len(examples[i]["token_ids"])):
            padded = (len(batch) + 1) * len(examples[i]["token_ids"])  # ascending: the newcomer is longest
            if batch and (len(batch) == batch_size or (tokens_per_batch and padded > tokens_per_batch)):
                batches.append(batch)
                batch = []
            batch.append(examples[i])
        batches.append(batch)
    runs = [batches[i:i + group] for i in range(0, len(batches), group)]
    rng.shuffle(runs)
    return [batch for run in runs for batch in run]


def collate(batch, device="cpu"):
    """Right-padded (input_ids, targets, loss_mask): input = sequence[:-1], targets = sequence[1:], and the
    loss covers positions prompt_len - 1 onwards, so only answer tokens (and eos) are predicted. Built on the
    host; a GPU gets them without a wait (qwen3.to_device)."""
    width = max(len(e["token_ids"]) for e in batch) - 1
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    targets = torch.zeros(len(batch), width, dtype=torch.long)
    loss_mask = torch.zeros(len(batch), width, dtype=torch.bool)
    for i, e in enumerate(batch):
        ids = torch.as_tensor(e["token_ids"])
        n = len(ids) - 1
        input_ids[i, :n], targets[i, :n] = ids[:-1], ids[1:]
        loss_mask[i, e["prompt_len"] - 1:n] = True
    return tuple(qwen3.to_device(t, device) for t in (input_ids, targets, loss_mask))


def describe_skipped(skipped):
    return ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) or "none"


# -----------------------------------------------------------------------------
# Synthetic offline dataset: sums of single-digit numbers, rewritten one addition at a time.
# Each line of the trace is the previous line with its first two terms added: a local step that a
# tiny model learns quickly, while the whole sum in one shot is hard for it.


def synth_problem(rng, n_terms):
    """(problem, answer, trace, carries): carries counts the steps whose sum passes a multiple of ten."""
    terms = [rng.randint(1, 9) for _ in range(n_terms)]
    lines, carries = [" + ".join(map(str, terms))], 0
    while len(terms) > 1:
        carries += (terms[0] % 10) + terms[1] >= 10
        terms = [terms[0] + terms[1]] + terms[2:]
        lines.append("= " + " + ".join(map(str, terms)))
    return f"What is {lines[0]}?", str(terms[0]), "\n".join(lines), carries


def synth_dataset(n_train, n_test, seed, min_terms=3, max_terms=3):
    """(train rows in the teacher schema, test rows in the MATH-500 schema), no problem in both."""
    if not 2 <= min_terms <= max_terms:
        raise ValueError(f"need 2 <= min_terms <= max_terms, got {min_terms} and {max_terms}")
    if n_test >= sum(9 ** n for n in range(min_terms, max_terms + 1)):  # leave problems for training
        distinct = sum(9 ** n for n in range(min_terms, max_terms + 1))
        raise ValueError(f"only {distinct} distinct problems: lower --n_test")
    rng = random.Random(seed)
    test, seen = [], set()
    while len(test) < n_test:
        n = rng.randint(min_terms, max_terms)
        problem, answer, _, carries = synth_problem(rng, n)
        if problem not in seen:  # level: 1 + the number of carries, the harder additions
            seen.add(problem)
            test.append({"problem": problem, "answer": answer, "subject": f"{n} terms", "level": 1 + carries,
                         "unique_id": f"synth/test/{len(test)}"})
    train = []
    while len(train) < n_train:
        problem, answer, trace, _ = synth_problem(rng, rng.randint(min_terms, max_terms))
        if problem not in seen:
            train.append({"problem": problem, "gtruth_answer": answer, "message_thinking": trace,
                          "message_content": f"The sum is {answer}.\n\n\\boxed{{{answer}}}"})
    return train, test


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p, sub = common.parser(__doc__, stats="what a teacher file holds: lengths, duplicates, wrong answers, "
                                          "overlap with the evaluation set",
                           synth="write the offline synthetic dataset",
                           **{"teacher-logits": "store a teacher's top-k log-probabilities for train.py "
                                                "--teacher_logits"})
    for s in (sub["stats"], sub["teacher-logits"]):  # the data, formatted as train.py formats it
        s.add_argument("--data_path", default="deepseek-r1-math-train",
                       help=f"teacher JSON/JSONL file or partition: {', '.join(PARTITIONS)}")
        s.add_argument("--use_think_tokens", action="store_true",
                       help="wrap the teacher's reasoning in <think>...</think>")
        s.add_argument("--max_seq_len", type=int, default=2048, help="drop examples longer than this")
        s.add_argument("--which_model", default="reasoning", choices=["base", "reasoning"],
                       help="tokenizer variant: 'reasoning' chat-wraps prompts, as train.py does by default")
        s.add_argument("--cache_dir", default=None, help="downloads and token cache "
                       "(default $DISTILL_CACHE or ~/.cache/reasoning-distill)")
    s = sub["stats"]
    s.add_argument("--tokenizer", default="Qwen/Qwen3-0.6B",
                   help="repo id, model directory, tokenizer.json or 'tiny'")
    s.add_argument("--against", default="math500", help="the evaluation set the problems must not overlap: "
                   "a set by name (downloaded once) or a JSON/JSONL file with a 'problem' per row")
    y = sub["synth"]
    y.add_argument("--out", "--out_dir", dest="out", required=True,
                   help="directory for train.json (teacher schema) and test.json (MATH-500 schema)")
    y.add_argument("--n_train", type=int, default=4000)
    y.add_argument("--n_test", type=int, default=200)
    y.add_argument("--seed", type=int, default=123)
    y.add_argument("--min_terms", type=int, default=3, help="fewest numbers to add in a problem")
    y.add_argument("--max_terms", type=int, default=3,
                   help="most numbers to add (longer sums take the tiny model longer to learn)")
    t = sub["teacher-logits"]
    t.add_argument("--teacher", required=True, help="Hub repo id, Hugging Face directory or checkpoint")
    t.add_argument("--out", required=True, help="the file to write (parts go to OUT.parts/ until it is done)")
    t.add_argument("--top_k", type=int, default=64, help="log-probabilities kept per answer token")
    t.add_argument("--tokenizer", default=None, help="encode the data with this tokenizer, the student's "
                   "(default: the teacher's; their vocabularies must agree)")
    t.add_argument("--batch_size", type=int, default=8, help="examples per teacher forward")
    t.add_argument("--device", default="auto", help="auto = cuda, then mps, then cpu")
    t.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="the teacher's dtype; auto = bfloat16 on cuda, float32 elsewhere")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.cmd == "teacher-logits":
        import teacher  # teacher.py builds on this file, so it comes in only here
        return teacher.write_logits(args)
    if args.cmd == "synth":
        train, test = synth_dataset(args.n_train, args.n_test, args.seed, args.min_terms, args.max_terms)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train.json").write_text(json.dumps(train, indent=1))
        (out / "test.json").write_text(json.dumps(test, indent=1))
        print(f"wrote {len(train)} training rows to {out / 'train.json'} and {len(test)} test rows to "
              f"{out / 'test.json'}")
        first = train[0]
        print(f"example problem: {first['problem']}\n{first['message_thinking']}\n{first['message_content']}")
        return
    return stats(args)


def stats(args):
    """The stats command: what a teacher file holds and what is wrong with it, before training on it."""
    rows = read_rows(resolve_data_path(args.data_path, args.cache_dir))
    tok = qwen3.load_tokenizer(args.tokenizer, args.which_model, args.cache_dir)
    examples, skipped, num_rows = prepare_examples(args.data_path, tok, args.use_think_tokens, args.cache_dir)
    print(f"rows: {num_rows}, usable: {len(examples)}, skipped: {describe_skipped(skipped)}")
    if not examples:
        raise ValueError("no usable rows")
    problem = lambda row: " ".join(problem_words(row["problem"])) if isinstance(row, dict) and \
        isinstance(row.get("problem"), str) else None
    graded = grade_teacher_answers(rows)
    seen, repeated, same_answer = set(), [], []
    for i, row in enumerate(rows):
        key = problem(row)
        answer = graded[i][0] if i in graded else checker.extract_answer(row.get("message_content")) \
            if isinstance(row, dict) else None
        if key is not None and key in seen:
            repeated.append(i)
            same_answer += [i] * ((key, answer) in seen)
        seen |= {key, (key, answer)}
    print(f"duplicates: {len(repeated)} rows repeat an earlier problem (after normalisation), "
          f"{len(same_answer)} with the same final answer too{rows_named(same_answer or repeated)}")
    wrong = [i for i, (_, correct) in graded.items() if not correct]
    print(f"teacher answers: {len(wrong)} of {len(graded)} graded wrong against gtruth_answer"
          f"{rows_named(wrong)}" if graded else "teacher answers: not graded (no gtruth_answer)")
    overlaps = evaluation_overlaps(args.against, args.cache_dir)
    print(f"contaminated: {describe_contaminated(contaminated(rows, overlaps), args.against)}")
    for part, lengths in (("total", [len(e["token_ids"]) for e in examples]),
                          ("answer", [len(e["token_ids"]) - e["prompt_len"] for e in examples])):
        st = length_stats(lengths, [e["row"] for e in examples])
        print(f"{part:>6} tokens: average {st['average']:.0f}, shortest {st['min']} (row {st['min_row']}), "
              f"longest {st['max']} (row {st['max_row']})")
    kept, counts = filter_by_length(examples, args.max_seq_len)
    too_long = [e["row"] for e in examples if len(e["token_ids"]) > args.max_seq_len]
    print(f"max_seq_len {args.max_seq_len}: original {counts['original']}, kept {counts['kept']}, "
          f"removed {counts['removed']}{rows_named(too_long)}")
    if kept:
        average = length_stats([len(e["token_ids"]) for e in kept])["average"]
        print(f"after filtering: average {average:.0f} tokens")


def grade_teacher_answers(rows, indices=None):
    """{row index: (extracted answer, correct)} for the rows with a gtruth_answer (among `indices`, default
    all): the checker's verdict on the teacher's final answer (message_content)."""
    todo = [i for i in (range(len(rows)) if indices is None else indices)
            if isinstance(rows[i], dict) and rows[i].get("gtruth_answer") is not None]
    bar, graded = qwen3.Progress(len(todo), "grade", unit="rows"), {}
    for i in todo:
        graded[i] = checker.grade_output(rows[i].get("message_content"), str(rows[i]["gtruth_answer"]))
        bar.update()
    bar.close()
    return graded


def rows_named(rows, shown=8):
    more = ", ..." if len(rows) > shown else ""
    return f" (rows {', '.join(map(str, rows[:shown]))}{more})" if rows else ""


if __name__ == "__main__":
    common.run(main)
