"""
MATH-500 evaluation: generate answers (greedy, or sampled with error bars) and grade them with a safe checker.

    python evaluate.py generate --model Qwen/Qwen3-0.6B-Base --which_model base --out runs/base.jsonl
    python evaluate.py generate --checkpoint_path runs/r1 --max_new_tokens 4096 --out runs/r1.jsonl
    python evaluate.py generate --checkpoint_path runs/r1 --preset thinking --num_samples 4 --out s4.jsonl
    python evaluate.py grade teacher.json --gtruth_answer gtruth_answer --generated_text message_content
    torchrun --standalone --nproc_per_node 8 evaluate.py generate ...   (the problems split over 8 GPUs)

Answers are graded by checker.py, which never runs model text as code.
"""
import json
import math
import queue
import shlex
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

import checker
import common
import data
import qwen3
import teacher

# -----------------------------------------------------------------------------
# Answering problems, with a local model (evaluation, or a local teacher) or through a server (a
# teacher behind an OpenAI-compatible API). The steps, as in the reference chapter: 1. the model and its
# tokenizer, 2. each problem's prompt, 3. the answers, 4. each one graded as it completes and written at once,
# 5. the summary: accuracy with error bars, by subject and level, and what went wrong.

LOOP_WINDOW, LOOP_PERIOD = 200, 50  # an answer "loops" when its last 200 tokens repeat a block of <= 50


def ends_in_loop(ids, window=LOOP_WINDOW, max_period=LOOP_PERIOD):
    """Whether the last `window` tokens are one block of at most max_period tokens, repeated: the usual end of
    a greedy answer that runs to the cap."""
    tail = list(ids[-window:])
    return len(tail) == window and any(tail[p:] == tail[:-p] for p in range(1, max_period + 1))


@dataclass
class Answer:
    """One answer, from either backend."""
    text: str  # all the model wrote; a server's separate reasoning is put back in <think>...</think>
    num_tokens: int
    finish_reason: str  # "stop" (it ended by itself), "length" (the cap)...
    seconds: float  # its own time: decoding (local), or the request with its retries (server)
    ids: list = None  # a local model's tokens
    thought_cut: bool = False
    usage: dict = None  # a server's prompt_tokens and completion_tokens


def make_record(index, sample, row, answer, tok):
    """An answer's record: also a row of a teacher file (problem, gtruth_answer, message_thinking,
    message_content), graded on its final answer (what follows the thinking). Without the student's
    tokenizer (tok None: a server's answers) the token counts of the thinking and the answer and the loop
    check are left out."""
    thinking, content = split_thinking(answer.text)
    extracted, correct = checker.grade_output(content, str(row.get("answer")))
    count = lambda text: len(tok.encode(text, chat_wrapped=False))
    ids = answer.ids if answer.ids is not None or tok is None else tok.encode(answer.text, chat_wrapped=False)
    record = {"index": index, "sample": sample, "unique_id": row.get("unique_id"),
              "subject": row.get("subject"), "level": row.get("level"), "problem": row["problem"],
              "gtruth_answer": row.get("answer"), "message_thinking": thinking, "message_content": content,
              "generated_text": answer.text, "extracted": extracted, "correct": correct,
              "num_tokens": answer.num_tokens, "thinking_tokens": tok and count(thinking),
              "content_tokens": tok and count(content), "finish_reason": answer.finish_reason,
              "truncated": answer.finish_reason == "length", "looped": ids is not None and ends_in_loop(ids),
              "boxed": checker.has_box(content), "thought_cut": answer.thought_cut,
              "seconds": round(answer.seconds, 3), **(answer.usage or {})}
    return record if tok else {k: v for k, v in record.items() if k not in STUDENT_TOKEN_FIELDS}


STUDENT_TOKEN_FIELDS = ("thinking_tokens", "content_tokens", "looped")


def split_thinking(text):
    """(thinking, final answer) of a model's text: a <think>...</think> block is the thinking (an unclosed one
    runs to the end: the answer never came); without one, all of it is the answer."""
    start = text.find("<think>")
    if start < 0:
        end = text.find("</think>")  # chat templates may put <think> in the prompt: only its end shows
        return (text[:end].strip(), text[end + len("</think>"):].strip()) if end >= 0 else ("", text.strip())
    end = text.find("</think>", start)
    if end < 0:
        return text[start + len("<think>"):].strip(), ""
    return text[start + len("<think>"):end].strip(), (text[:start] + text[end + len("</think>"):]).strip()


def sampling_settings(args):
    """Decoding settings: the preset, with any of --temperature/--top_p/--top_k given on top of it."""
    greedy = dict(temperature=0.0, top_p=1.0, top_k=0)
    preset = qwen3.THINKING_SAMPLING if args.preset == "thinking" else greedy
    chosen = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in preset.items()}
    return qwen3.Sampling(**chosen, seed=args.seed).check()


def thinking_budget(args, tok):
    if args.thinking_budget is None:
        return None
    if not 0 < args.thinking_budget <= args.max_new_tokens:
        raise ValueError(f"--thinking_budget must be in 1..--max_new_tokens ({args.max_new_tokens}), "
                         f"got {args.thinking_budget}")
    return qwen3.ThinkingBudget(args.thinking_budget, tok.tok.token_to_id("<think>"),
                                tok.encode("</think>\n\n", chat_wrapped=False), args.answer_budget)


def protocol(args, tok, dtype, sampling):
    """Everything that decides the numbers: every summary states it, and --resume insists on it."""
    model = f"{args.api_model} at {args.api_base}" if args.api_base else \
        str(args.checkpoint_path or args.model)
    prompt = "reference" if args.prompt_template is None else args.prompt_template
    return {"model": model, "tokenizer": tok and tok.kind, "prompt": prompt,
            "data": str(args.data_path or "math500"), "dataset_size": args.dataset_size,
            "max_new_tokens": args.max_new_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
            "seed": sampling.seed, "num_samples": args.num_samples, "thinking_budget": args.thinking_budget,
            "answer_budget": args.answer_budget if args.thinking_budget else None,
            "dtype": "server" if args.api_base else str(dtype).replace("torch.", ""),
            "checker": checker.VERSION}


def describe_protocol(p):
    """One line: how the answers were made and graded, to print beside an accuracy."""
    decoding = "greedy" if not p.get("temperature") else (
        f"T={p['temperature']:g}" + (f" top_p={p['top_p']:g}" if p["top_p"] < 1 else "")
        + (f" top_k={p['top_k']}" if p["top_k"] else ""))
    samples = f", {p['num_samples']} samples" if p.get("num_samples", 1) > 1 else ""
    budget = f", thinking budget {p['thinking_budget']}" if p.get("thinking_budget") else ""
    return f"{decoding}{samples}, max {p.get('max_new_tokens')} tokens{budget}, checker v{p.get('checker')}"


def local_answers(args, model, tok, prompts, todo, sampling, budget):
    """3. A local model's answers to todo's (problem, sample) pairs, as they complete: ((i, s), Answer)."""
    prompts = {i: tok.encode(prompt) for i, prompt in prompts.items()}
    # similar prompt lengths enter the batch together (less padding), a problem's samples too (one prefill)
    todo = sorted(todo, key=lambda pair: (len(prompts[pair[0]]), pair))
    tokens, started = {}, {}
    for j, token, done in qwen3.generate_stream(model, [prompts[i] for i, _ in todo], args.max_new_tokens,
                                                tok.eos_token_id, batch_size=args.batch_size,
                                                sampling=sampling, keys=todo, budget=budget):
        started.setdefault(j, time.time())
        tokens.setdefault(j, []).append(token)
        if done:
            ids = tokens.pop(j)
            finished = ids[-1] == tok.eos_token_id
            yield todo[j], Answer(tok.decode(ids[:-1] if finished else ids), len(ids),
                                  "stop" if finished else "length", time.time() - started.pop(j), ids,
                                  budget is not None and budget.cut_at(ids) is not None)


def server_answers(args, server, prompts, todo, sampling):
    """3. A server's answers, --num_workers requests in flight, as they complete: ((i, s), Answer), or
    ((i, s), error) for a request that failed every try or one that stops the run (teacher.ServerError)."""
    jobs, results, stop = queue.Queue(), queue.Queue(), threading.Event()
    for pair in todo:
        jobs.put(pair)

    def work():
        while not stop.is_set():
            try:
                i, s = jobs.get_nowait()
            except queue.Empty:
                return
            start = time.time()
            seed = sampling.stream((i, s)).randrange(2**31)  # the pair's own, as a local model's stream
            try:
                reply = server.complete(prompts[i], args.max_new_tokens, sampling, seed)
            except (teacher.ServerError, teacher.GaveUp) as error:
                results.put(((i, s), error))
                continue
            text = reply.content  # where the server split the thinking off, it goes back in <think>..</think>
            if reply.reasoning:
                text = f"<think>\n{reply.reasoning}\n</think>\n\n{reply.content}"
            usage = {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens}
            results.put(((i, s), Answer(text, reply.completion_tokens, reply.finish_reason,
                                        time.time() - start, usage=usage)))
    # daemon threads: on Ctrl-C or a fatal error the requests in flight are dropped, not waited for
    for _ in range(min(args.num_workers, len(todo))):
        threading.Thread(target=work, daemon=True).start()
    try:
        for _ in todo:
            yield results.get()
    finally:
        stop.set()  # no new requests


def generate_records(answers, rows, tok, out_file, total, quiet=False):
    """4. Grade each answer as it completes and append its record to out_file at once (a kill loses at most
    the line being written, which --resume detects and redoes). Returns (records, seconds, requests given
    up)."""
    bar = qwen3.Progress(total, "generate", unit="answers", quiet=quiet)
    start, records, gave_up, correct, tokens = time.time(), [], [], 0, 0
    for (i, s), answer in answers:
        if isinstance(answer, teacher.ServerError):
            raise answer
        if isinstance(answer, teacher.GaveUp):
            gave_up.append(f"problem {i} sample {s}: {answer}")
        else:
            record = make_record(i, s, rows[i], answer, tok)
            out_file.write(json.dumps(record, ensure_ascii=False) + "\n")
            out_file.flush()
            records.append(record)
            correct, tokens = correct + record["correct"], tokens + record["num_tokens"]
        bar.update(1, f"{correct}/{len(records)} correct ({100 * correct / max(len(records), 1):.1f}%), "
                      f"{tokens / max(time.time() - start, 1e-9):,.0f} tokens/s"
                      + (f", {len(gave_up)} given up" if gave_up else ""))
    bar.close()
    return records, time.time() - start, gave_up


def run_generation(args):
    """The generate command, in one process or one of several under torchrun: each process answers a share of
    the problems into its own part file; the first merges them into --out and writes the summary."""
    rank, world_size, device = common.init_processes(args.device, group=False)  # no collectives: files only
    out = Path(args.out)
    rows = data.load_problems(args.data_path, args.cache_dir)[:args.dataset_size]
    template = read_template(args.prompt_template)
    check_generation_args(args, out, world_size)
    # 1. the model and its tokenizer; or a server, and the student's tokenizer to measure its answers with
    dtype = qwen3.pick_dtype(args.dtype, device)
    if args.api_base:
        server = teacher.ChatServer(args.api_base, args.api_model, args.api_key_env, args.timeout, args.tries)
        try:
            tok = qwen3.load_tokenizer(args.model, args.which_model, args.cache_dir)
        except (qwen3.DownloadError, FileNotFoundError) as error:  # a server's run can do without it
            tok = None
            print(f"note: no {', '.join(STUDENT_TOKEN_FIELDS)} in the records (the student's tokenizer, "
                  f"--model {args.model}, could not be loaded: {str(error).splitlines()[0]}); token counts "
                  "are the server's", file=sys.stderr)
    else:
        model, tok = qwen3.load(args.checkpoint_path or args.model, args.which_model, device, dtype,
                                args.cache_dir)
    sampling, budget = sampling_settings(args), thinking_budget(args, tok)
    settings = protocol(args, tok, dtype, sampling)
    summary_path = summary_path_of(out)
    if args.resume and summary_path.exists():
        check_same_protocol(json.loads(summary_path.read_text()).get("protocol", {}), settings, out)
    # 2. the prompts; each process takes every world_size-th problem in order of prompt length (balanced work)
    by_length = sorted(range(len(rows)), key=lambda i: len(rows[i]["problem"]))
    mine = set(by_length[rank::world_size])
    part = part_path(out, rank, world_size)
    done_flag = part.with_suffix(".done")
    previous = read_records(out) if args.resume and out.exists() else []
    previous_part = read_records(part) if args.resume and part != out and part.exists() else []
    done = {(r["index"], r.get("sample", 0)) for r in previous + previous_part}
    todo = [(i, s) for i in sorted(mine) for s in range(args.num_samples) if (i, s) not in done]
    prompts = {i: data.render_prompt(rows[i]["problem"], template) for i, _ in todo}
    out.parent.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        where = f"server {server.url}, {args.num_workers} requests in flight" if args.api_base else \
            f"device {device} ({settings['dtype']}) x {world_size} processes"
        print(f"{where}, model {settings['model']}, tokenizer {settings['tokenizer']}: "
              f"{describe_protocol(settings)}; {len(rows)} problems, {len(todo)} answers to make")
        print(overlap_with_evaluation_set(args, rows))
        summary_path.write_text(json.dumps({"protocol": settings, "complete": False}, indent=2))
    done_flag.unlink(missing_ok=True)
    write_records(part, previous if part == out else previous_part)  # without a cut-off last line
    answers = server_answers(args, server, prompts, todo, sampling) if args.api_base else \
        local_answers(args, model, tok, prompts, todo, sampling, budget)
    # 3-4. the answers, graded and written as they complete
    with open(part, "a", encoding="utf-8") as f:
        try:
            new, wall, gave_up = generate_records(answers, rows, tok, f, len(todo), quiet=rank > 0)
        except (torch.OutOfMemoryError, KeyboardInterrupt) as stop:
            why = "interrupted" if isinstance(stop, KeyboardInterrupt) else (
                "error: out of memory (the KV cache holds batch_size x (longest prompt + max_new_tokens) "
                "positions): lower --batch_size")
            f.flush()
            raise SystemExit(f"{why}; the {len(read_records(part))} finished answers are kept in {part}; "
                             f"continue with: {continue_command(args)}") from None
    if rank > 0:
        return done_flag.touch()
    records = previous + (new if world_size == 1 else merge_parts(out, world_size))
    # one record per (problem, sample), in order: the same file whatever the batch size or number of processes
    records = sorted({(r["index"], r.get("sample", 0)): r for r in records}.values(),
                     key=lambda r: (r["index"], r.get("sample", 0)))
    write_records(out, records)
    if args.teacher_json:  # the reference's teacher-file format, to share
        shared = [{k: r[k] for k in ("problem", "gtruth_answer", "message_thinking", "message_content")}
                  for r in records]
        Path(args.teacher_json).write_text(json.dumps(shared, indent=1, ensure_ascii=False), encoding="utf-8")
        print(f"wrote {len(shared)} teacher rows to {args.teacher_json}")
    # 5. the summary
    summary = finish(args, records, wall, settings, out, complete=not gave_up)
    if gave_up:
        print(f"{len(gave_up)} answers failed every try ({gave_up[-1]}): run the same command with --resume "
              "to ask for them again", file=sys.stderr)
    return summary


def check_same_protocol(old, now, out):
    changed = {k: (old.get(k), v) for k, v in now.items() if old.get(k) != v}
    if changed:
        raise ValueError(f"--resume: {out} was made with other settings, (then, now): {changed}; choose "
                         "another --out")


def part_path(out, rank, world_size):
    """Where a process writes its answers: --out itself, or under torchrun a part file of its own."""
    return out if world_size == 1 else out.with_name(f"{out.stem}.part{rank}-of-{world_size}{out.suffix}")


def merge_parts(out, world_size):
    """The first process, done with its part: the records of every part once all are done (a process marks its
    part done with a .done file; torchrun stops everyone if one fails), the parts then removed."""
    parts = [part_path(out, rank, world_size) for rank in range(world_size)]
    while not all(p.with_suffix(".done").exists() for p in parts[1:]):
        time.sleep(1)
    records = [r for p in parts for r in read_records(p)]
    for p in parts:
        p.with_suffix(".done").unlink(missing_ok=True)
        p.unlink()
    return records


def overlap_with_evaluation_set(args, rows):
    """One line, before the first answer is asked for: do these problems overlap the evaluation set? Answers
    to them would make a student trained on them score higher there."""
    here = data.resolve_data_path(args.data_path or "math500", args.cache_dir)
    there = data.resolve_data_path(args.against, args.cache_dir, download=False)
    if there is not None and here.resolve() == there.resolve():
        return f"problems: the evaluation set itself ({args.against})"
    overlaps = there and data.evaluation_overlaps(there, args.cache_dir)
    if overlaps is None:
        return f"overlap with {args.against}: not checked (not downloaded yet: a run on it downloads it)"
    found = data.contaminated(rows, overlaps)
    if not found:
        return f"overlap with {args.against}: none"
    return (f"warning: {data.describe_contaminated(found, args.against)}: answers to them would make a "
            "student score higher there; train.py --decontaminate drops them")


def read_template(template):
    """--prompt_template: the text itself or a file holding it; None is the reference's template."""
    if template is None:
        return data.PROMPT_TEMPLATE
    text = Path(template).read_text(encoding="utf-8") if Path(template).is_file() else template
    if "{problem}" not in text:
        raise ValueError("--prompt_template needs {problem} where the problem goes")
    return text


def check_generation_args(args, out, world_size):
    if out.exists() and out.stat().st_size and not args.resume:
        raise ValueError(f"{out} exists: add --resume to continue it, or choose another --out")
    if args.num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1, got {args.num_samples}")
    if bool(args.api_base) != bool(args.api_model):
        raise ValueError("a server needs both --api_base (e.g. http://localhost:8000/v1) and --api_model")
    if args.api_base and (args.checkpoint_path or args.thinking_budget or world_size > 1):
        raise ValueError("--api_base asks a server: --checkpoint_path, --thinking_budget and torchrun are "
                         "for a local model (more requests in flight: --num_workers)")
    if args.num_workers < 1 or args.timeout <= 0 or args.tries < 1:
        raise ValueError("--num_workers and --tries must be >= 1 and --timeout > 0")


def continue_command(args):
    """The command line that continues this run (it holds no key: keys live in the environment)."""
    argv = [a for a in args.argv if a != "--resume"]
    return "python evaluate.py " + " ".join(map(shlex.quote, [*argv, "--resume"]))


def grade_file(args):
    """The grade command: grade answers already in a file (e.g. a teacher's), no model."""
    rows = data.read_rows(args.json_path)
    missing = [f for f in (args.gtruth_answer, args.generated_text)
               if not isinstance(rows[0], dict) or f not in rows[0]]
    if missing:
        fields = sorted(rows[0]) if isinstance(rows[0], dict) else "-"
        raise ValueError(f"{args.json_path}: rows have no field {missing[0]!r} (fields: {fields})")
    records = []
    for i, row in enumerate(rows):
        text, ref = row.get(args.generated_text), row.get(args.gtruth_answer)
        extracted, correct = checker.grade_output(text, str(ref))
        records.append({"index": i, "sample": 0, "subject": row.get("subject"), "level": row.get("level"),
                        "gtruth_answer": ref, "generated_text": text, "extracted": extracted,
                        "correct": correct, "boxed": isinstance(text, str) and checker.has_box(text)})
    out = Path(args.out)
    write_records(out, records)
    return finish(args, records, None, {"data": args.json_path, "checker": checker.VERSION}, out)


def finish(args, records, wall_time_s, settings, out, complete=True):
    summary = {**summarize(records, wall_time_s, settings, getattr(args, "price_in", None),
                           getattr(args, "price_out", None)), "complete": complete}
    print_summary(summary)
    summary_path_of(out).write_text(json.dumps(summary, indent=2))
    print(f"wrote {out} and {summary_path_of(out)}")
    if args.cross_check:
        cross_check(records)
    return summary


def summary_path_of(out):
    return out.with_suffix(".summary.json") if out.suffix == ".jsonl" else Path(str(out) + ".summary.json")


def write_records(path, records):
    """One JSON line per record, the file written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    qwen3.save_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_records(path):
    """Records of a previous run; a truncated last line (an interrupted write) is dropped."""
    records = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):
                raise ValueError(f"{path}: line {n} is not valid JSON (only the last line may be cut "
                                 "off)") from None
            print(f"dropping the truncated last line of {path}", file=sys.stderr)
    return records


# -----------------------------------------------------------------------------
# Summaries: pass@1 with its standard error, pass@k and majority vote over samples, and what went wrong


def wilson_interval(correct, n, z=1.96):
    """95% confidence interval of an accuracy (Wilson score), as (low, high)."""
    if n == 0:
        return 0.0, 0.0
    p = correct / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # clamped: rounding must not leave [0, 1]
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def pass_at_k(n, c, k):
    """Unbiased estimate of the chance that one of k answers drawn from n (c of them correct) is correct:
    1 - C(n - c, k) / C(n, k) (Chen et al., 2021)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_answer(records):
    """The record whose answer most samples agree on, answers grouped by the checker's equivalence (exact text
    first, then grade); ties go to the answer that came first. None when no sample has an answer."""
    groups = []  # [representative record, count], in order of first appearance
    for r in sorted(records, key=lambda r: r.get("sample", 0)):
        if r["extracted"] is None:
            continue
        for group in groups:
            first = group[0]["extracted"]
            if first == r["extracted"] or checker.grade(r["extracted"], first):
                group[1] += 1
                break
        else:
            groups.append([r, 1])
    return max(groups, key=lambda g: g[1])[0] if groups else None  # max keeps the first of equal counts


def accuracy_stats(by_problem):
    """For a list of problems (each a list of its records): pass@1 (the mean over problems of each one's share
    of correct answers) with its standard error and 95% interval; with several samples, pass@k and maj@N."""
    shares = [sum(r["correct"] for r in rs) / len(rs) for rs in by_problem]
    n, samples = len(shares), max(map(len, by_problem), default=1)
    mean = sum(shares) / n if n else 0.0
    stderr = math.sqrt(sum((x - mean) ** 2 for x in shares) / (n - 1) / n) if n > 1 else 0.0
    num_correct = sum(r["correct"] for rs in by_problem for r in rs)
    stats = {"accuracy": mean, "stderr": stderr, "num_correct": num_correct, "num_examples": n}
    if samples == 1:  # one answer per problem: a binomial proportion, whose best interval is Wilson's
        stats["ci95"] = list(wilson_interval(num_correct, n))
        return stats
    stats["ci95"] = [max(0.0, mean - 1.96 * stderr), min(1.0, mean + 1.96 * stderr)]
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, samples) if k <= samples})
    stats["pass@k"] = {k: sum(pass_at_k(len(rs), sum(r["correct"] for r in rs), k) for rs in by_problem) / n
                       for k in ks}
    majority = [majority_answer(rs) for rs in by_problem]
    stats[f"maj@{samples}"] = sum(bool(m and m["correct"]) for m in majority) / n
    return stats


def summarize(records, wall_time_s=None, settings=None, price_in=None, price_out=None):
    """Accuracy (pass@1) with error bars, pass@k and maj@N with several samples, all by subject and level
    too; response lengths and the shares of answers that hit the cap, loop, have no box or had their thought
    cut; token lengths per field; from a server, its token counts and (given $ per million tokens) the
    cost."""
    problems = defaultdict(list)
    for r in records:
        problems[r["index"]].append(r)
    by_problem = list(problems.values())
    summary = {**accuracy_stats(by_problem), "num_samples": max(map(len, by_problem), default=1)}
    for key in ("subject", "level"):
        groups = defaultdict(list)
        for rs in by_problem:
            groups[str(rs[0].get(key))].append(rs)
        summary[f"by_{key}"] = {k: accuracy_stats(v) for k, v in sorted(groups.items())}
    for flag in ("truncated", "looped", "boxed", "thought_cut"):
        if records and flag in records[0]:
            summary[f"{flag}_share"] = sum(r[flag] for r in records) / len(records)
    if records and "num_tokens" in records[0]:
        tokens = sum(r["num_tokens"] for r in records)
        summary["avg_response_tokens"] = tokens / len(records)
        if wall_time_s:
            summary.update(wall_time_s=wall_time_s, tokens_per_sec=tokens / wall_time_s)
    fields = [f for f in ("thinking_tokens", "content_tokens", "num_tokens") if records and f in records[0]]
    summary["lengths"] = {f: data.length_stats([r[f] for r in records]) for f in fields}
    if records and "completion_tokens" in records[0]:  # the server's counts: what it bills
        usage = {k: sum(r[k] for r in records) for k in ("prompt_tokens", "completion_tokens")}
        if price_in is not None and price_out is not None:
            usage["cost_usd"] = (usage["prompt_tokens"] * price_in
                                 + usage["completion_tokens"] * price_out) / 1e6
            usage["cost_usd_per_1000_answers"] = 1000 * usage["cost_usd"] / len(records)
        summary["usage"] = usage
    return {**summary, "protocol": settings or {}, "complete": True}


def print_summary(s):
    samples = s["num_samples"]
    problems = "" if samples == 1 else f", {s['num_examples']} problems"
    print(f"accuracy (pass@1): {100 * s['accuracy']:.1f}% ± {100 * s['stderr']:.1f} (standard error), "
          f"95% CI {100 * s['ci95'][0]:.1f}-{100 * s['ci95'][1]:.1f}% "
          f"({s['num_correct']}/{s['num_examples'] * samples} answers{problems})")
    if samples > 1:
        print(f"  maj@{samples} {100 * s[f'maj@{samples}']:.1f}%, "
              + ", ".join(f"pass@{k} {100 * v:.1f}%" for k, v in s["pass@k"].items()))
    for key in ("by_subject", "by_level"):
        print(f"  {key[3:]:>8}: " + ", ".join(f"{k} {100 * v['accuracy']:.0f}%" for k, v in s[key].items()))
    if "avg_response_tokens" in s:
        looped = f", {100 * s['looped_share']:.1f}% end in a loop" if "looped_share" in s else ""
        print(f"  average answer {s['avg_response_tokens']:.0f} tokens; "
              f"{100 * s['truncated_share']:.1f}% hit the cap{looped}, "
              f"{100 * (1 - s['boxed_share']):.1f}% have no box, {100 * s['thought_cut_share']:.1f}% had "
              "their thought cut" + (f"; {s['wall_time_s']:.0f} s, {s['tokens_per_sec']:.0f} tokens/s"
                                     if "wall_time_s" in s else ""))
    if s.get("lengths"):
        print("  tokens (student's tokenizer)  average  median      min      max")
        for field, st in s["lengths"].items():
            print(f"  {field:<28} {st['average']:8.0f} {st['median']:7} {st['min']:8} {st['max']:8}")
    if "usage" in s:
        u = s["usage"]
        print(f"  server tokens: {u['prompt_tokens']:,} in, {u['completion_tokens']:,} out"
              + (f"; cost ${u['cost_usd']:.2f} (${u['cost_usd_per_1000_answers']:.2f} per 1,000 answers)"
                 if "cost_usd" in u else " (--price_in/--price_out for the cost)"))
    if s["protocol"].get("max_new_tokens"):
        print(f"  protocol: {describe_protocol(s['protocol'])}")


def cross_check(records):
    """Grade again with Hugging Face's math-verify (optional) and list the disagreements."""
    try:
        from math_verify import parse, verify  # optional: only this comparison needs it
    except ImportError:
        raise ValueError("--cross_check needs the optional package math-verify "
                         "(pip install math-verify)") from None
    disagreements = []
    for r in records:
        try:
            theirs = bool(verify(parse(f"${r['gtruth_answer']}$"), parse(r["generated_text"] or "")))
        except Exception:
            theirs = False
        if theirs != r["correct"]:
            disagreements.append(r)
            print(f"  [{r['index']}] ours {r['correct']}, math-verify {theirs}: extracted "
                  f"{r['extracted']!r}, reference {r['gtruth_answer']!r}")
    print(f"math-verify disagrees on {len(disagreements)} of {len(records)}")
    return disagreements


def parse_args(argv=None):
    p, sub = common.parser(__doc__, default="generate",
                           generate="answer MATH-500 (or a file in its schema) and grade the answers",
                           grade="grade answers already in a file (no model)")
    g = sub["generate"]
    a = g.add_argument
    a("--model", default="Qwen/Qwen3-0.6B-Base", help="Hub repo id, Hugging Face-layout directory, or a "
      "random model ('tiny', 'random-0.6B'); with --api_base, only the tokenizer that counts answer tokens")
    a("--which_model", default="base", choices=["base", "reasoning"], help="tokenizer variant: 'reasoning' "
      "chat-wraps prompts and ends answers at <|im_end|>; 'base' is plain text ending at <|endoftext|>")
    a("--checkpoint_path", default=None, help="a checkpoint of train.py (a .pth file, or a run directory for "
      "its latest epoch): it carries its model and tokenizer variant")
    a("--data_path", default=None, help="problems: a set by name, downloaded once (math500, or math-train: "
      "the 12,000 MATH problems outside MATH-500, the reference's teacher prompts), or a JSON/JSONL file of "
      "rows with 'problem' and 'answer' (or 'gtruth_answer'); default: math500")
    a("--dataset_size", type=int, default=None, help="evaluate only the first N problems")
    a("--max_new_tokens", type=int, default=2048, help="the cap on an answer; the reference used 4096 for "
                                                      "distilled models")
    a("--batch_size", type=int, default=16, help="answers generated together; a finished one's slot takes "
      "the next (answers are the same at any batch size)")
    a("--preset", default="greedy", choices=["greedy", "thinking"],
      help="decoding: greedy (the reference protocol) or the Qwen3 model card's thinking-mode sampling "
           "(temperature 0.6, top_p 0.95, top_k 20)")
    a("--temperature", type=float, default=None, help="sampling temperature, over the preset (0 = greedy)")
    a("--top_p", type=float, default=None, help="nucleus sampling, over the preset, in (0, 1]")
    a("--top_k", type=int, default=None,
      help="sample among the k most likely tokens, over the preset (0 = all)")
    a("--seed", type=int, default=0, help="sampling seed: answer (problem, sample) draws from its own stream")
    a("--num_samples", type=int, default=1, help="answers per problem (prompt prefilled once); the summary "
      "then has pass@1 +- standard error, pass@k and maj@N")
    a("--thinking_budget", type=int, default=None,
      help="close a thought still open after this many answer tokens with </think>, then allow "
           "--answer_budget more for the final answer (budget forcing: plain truncation would leave no "
           "answer)")
    a("--answer_budget", type=int, default=512, help="tokens for the final answer after a thought is cut")
    a("--prompt_template", default=None, help="the prompt, with {problem} where the problem goes: the text "
      "or a file holding it (default: the reference's template)")
    a("--out", default="math500.jsonl", help="one JSON line per answer (also a teacher file for train.py "
      "--data_path); the summary goes to OUT.summary.json")
    a("--teacher_json", default=None, help="also write the answers as the reference's teacher file: a JSON "
      "array of problem, gtruth_answer, message_thinking, message_content")
    a("--resume", action="store_true", help="continue a partial --out file with the same settings")
    a("--against", default="math500", help="say, before the first answer, whether --data_path overlaps this "
      "evaluation set: a set by name (checked once downloaded) or a JSON/JSONL file with a 'problem' per row")
    a("--device", default="auto", help="auto = cuda, then mps, then cpu")
    a("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="auto = bfloat16 on cuda, "
      "float32 elsewhere; float32 means true float32 matmuls (TF32 off: exact, slow on GPUs)")
    a("--cache_dir", default=None, help="downloads (default $DISTILL_CACHE or ~/.cache/reasoning-distill)")
    api = g.add_argument_group("a teacher behind an OpenAI-compatible server (OpenRouter, vLLM, SGLang, "
                               "Ollama, llama.cpp) instead of a local model; --model then only names the "
                               "tokenizer that measures the answers")
    api.add_argument("--api_base", default=None, help="the server's base URL, e.g. "
                     "https://openrouter.ai/api/v1 or http://localhost:8000/v1")
    api.add_argument("--api_model", default=None, help="the model's name there, e.g. deepseek/deepseek-r1")
    api.add_argument("--api_key_env", default="OPENAI_API_KEY", help="the environment variable holding the "
                     "API key (none needed by a local server); the key is never printed or written")
    api.add_argument("--num_workers", type=int, default=8, help="requests in flight")
    api.add_argument("--timeout", type=float, default=600.0, help="seconds per request before it is retried")
    api.add_argument("--tries", type=int, default=8, help="tries per answer (exponential backoff and jitter "
                     "between them; 429 waits for Retry-After); an answer that fails all waits for --resume")
    api.add_argument("--price_in", type=float, default=None, help="$ per million input tokens, for the cost")
    api.add_argument("--price_out", type=float, default=None, help="$ per million output tokens")
    r = sub["grade"]
    r.add_argument("json_path", help="a JSON/JSONL file of rows with a reference answer and a generated text")
    r.add_argument("--gtruth_answer", default="gtruth_answer", help="the field holding the reference answer")
    r.add_argument("--generated_text", default="generated_text", help="the field holding the generated text")
    r.add_argument("--out", default="graded.jsonl", help="records, and the summary in OUT.summary.json")
    for s in sub.values():
        s.add_argument("--cross_check", action="store_true",
                       help="also grade with math-verify (optional package) and list the disagreements")
    return p.parse_args(common.with_command(argv, sub, lambda argv: "generate"))


def main(argv=None):
    args = parse_args(argv)
    args.argv = common.with_command(argv, ("generate", "grade"), lambda argv: "generate")  # shown on Ctrl-C
    return grade_file(args) if args.cmd == "grade" else run_generation(args)


if __name__ == "__main__":
    common.run(main)
