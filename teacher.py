"""
Everything a teacher does: answering problems from a server (the teacher data), scoring the student's next
tokens as a model in memory (soft distillation) or from a file of its top-k log-probabilities written once,
the divergence between the two distributions, and the student's own answers for it to score (on-policy).

    python data.py teacher-logits --teacher Qwen/Qwen3-4B --use_think_tokens --out r1-top64.pt
"""
import math
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import checker
import data
import qwen3

# -----------------------------------------------------------------------------
# A teacher behind a server: a client for any OpenAI-compatible chat-completions server (OpenRouter, vLLM,
# SGLang, Ollama's /v1, llama.cpp's server), used by evaluate.py generate --api_base from several threads.
# Faults are retried with exponential backoff and jitter; what retrying cannot fix stops the run with one line
# saying what to fix. The API key is read from the environment and never printed or written anywhere.

RETRY_BASE_S, RETRY_CAP_S, RETRY_AFTER_CAP_S = 2.0, 60.0, 600.0


class ServerError(ValueError):
    """An answer retrying cannot fix (refused key, unknown model, bad request, no server): stop the run."""


class GaveUp(RuntimeError):
    """One request failed every try: its answer is left for a later --resume."""


class Retry(Exception):
    def __init__(self, why, wait=None):
        super().__init__(why)
        self.wait = wait  # seconds the server asked for (429 Retry-After), else None: back off


@dataclass
class Reply:
    content: str
    reasoning: str  # the thinking, where the server splits it off ("" where it does not)
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class ChatServer:
    def __init__(self, api_base, model, key_env="OPENAI_API_KEY", timeout=600.0, tries=8):
        import requests  # imported where used: only API runs need it
        self.requests, self.model, self.timeout, self.tries = requests, model, timeout, tries
        self.key_env = key_env
        base = api_base.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self._key = os.environ.get(key_env) or None
        self.sessions = threading.local()  # one connection pool per thread
        self.answered = False  # once a request succeeded, a refused connection is a restart: retried

    def complete(self, prompt, max_tokens, sampling, seed=None):
        """The server's Reply to one user message, after as many tries as transient faults need."""
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
                "stream": False}
        if sampling.top_k:
            body["top_k"] = sampling.top_k
        if sampling.temperature > 0 and seed is not None:
            body["seed"] = seed  # reproducible samples where the server supports it (vLLM, OpenAI, Ollama)
        for attempt in range(self.tries):
            try:
                return self._request(body)
            except Retry as e:
                why = e
                if attempt + 1 < self.tries:  # exponential backoff with full jitter, or what 429 asked for
                    time.sleep(e.wait if e.wait is not None else
                               random.uniform(0, min(RETRY_CAP_S, RETRY_BASE_S * 2 ** attempt)))
        raise GaveUp(f"{self.tries} tries failed, the last: {why}")

    def _request(self, body):
        requests = self.requests
        session = getattr(self.sessions, "session", None) or requests.Session()
        self.sessions.session = session
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        try:
            r = session.post(self.url, json=body, headers=headers, timeout=self.timeout)
        except requests.Timeout:
            raise Retry(f"no answer within --timeout {self.timeout:g} s") from None
        except requests.ConnectionError as e:
            refused = "NewConnectionError" in repr(e) or "Connection refused" in str(e)
            if refused and not self.answered:
                raise ServerError(f"no server answers at {self.url}: start it first (e.g. `vllm serve "
                                  "MODEL`, `ollama serve`, `llama-server`), or check --api_base") from None
            raise Retry(f"connection error ({type(e).__name__})") from None
        except requests.RequestException as e:  # a body cut short, a reset while reading it
            raise Retry(f"connection broken ({type(e).__name__})") from None
        if r.status_code == 429:
            raise Retry("HTTP 429 (rate limited)", _retry_after(r.headers.get("Retry-After")))
        if r.status_code >= 500 or r.status_code in (408, 409, 425):
            raise Retry(f"HTTP {r.status_code}")
        if r.status_code != 200:
            raise ServerError(self._explain(r))
        try:
            reply = r.json()
            choice = reply["choices"][0]
            message = choice["message"]
            content = message.get("content") or ""
            reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
            if not isinstance(content, str) or not isinstance(reasoning, str):
                raise TypeError("content or reasoning is not text")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise Retry(f"invalid response body ({type(e).__name__})") from None
        usage = reply.get("usage") or {}
        self.answered = True
        return Reply(content, reasoning, choice.get("finish_reason") or "stop",
                     int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))

    def _explain(self, r):
        """One line for an answer that retrying cannot fix: what the server said and what to do."""
        try:
            said = r.json().get("error") or r.json()
            said = said.get("message", said) if isinstance(said, dict) else said
        except ValueError:
            said = r.text
        said = self.scrub(" ".join(str(said).split())[:300])
        if r.status_code in (401, 403):
            fix = (f"the server refused the API key: put a valid one in ${self.key_env} (or name another "
                   "variable with --api_key_env)" if self._key else
                   f"the server wants an API key: set ${self.key_env} (or name the variable with "
                   "--api_key_env)")
        elif r.status_code == 404 or "model" in said.lower():
            fix = f"check --api_model {self.model} (is it served there?) and --api_base (it ends in /v1)"
        else:
            fix = "the server rejected the request: check --max_new_tokens and the sampling flags"
        return f"{self.url}: HTTP {r.status_code} ({said}): {fix}"

    def scrub(self, text):
        """Text from the server or an exception, with the key blanked out should it ever appear."""
        return text.replace(self._key, "***") if self._key else text


def _retry_after(value):
    """Seconds from a Retry-After header (seconds or an HTTP date), capped; None without one."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_S)


# -----------------------------------------------------------------------------
# Soft targets. The KD term compares the student's next-token distribution with the teacher's at every
# answer position; the teacher's comes from a model in memory (Teacher) or from a file (TeacherLogits). Both
# plug into train.answer_loss: targets(...) once per micro-batch, divergence(...) per chunk of positions.


def divergence(student, teacher, kind, beta):
    """Per-row divergence of two distributions given as log-probabilities over the same support."""
    def kl(log_p, log_q):  # KL(p || q) with 0 log 0 = 0; inputs stay finite, so no NaN reaches a gradient
        return torch.where(log_p.exp() > 0, log_p.exp() * (log_p - log_q), 0.0).sum(-1)
    lowest = torch.finfo(torch.float32).min
    s, t = student.clamp(min=lowest), teacher.clamp(min=lowest)
    if kind == "forward_kl":
        return kl(t, s)
    if kind == "reverse_kl":
        return kl(s, t)
    mixture = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), 0)
    return beta * kl(t, mixture) + (1 - beta) * kl(s, mixture)


@dataclass
class KD:
    """The KD term: forward_kl (KL(teacher || student)), reverse_kl (KL(student || teacher)) or jsd (the
    generalised Jensen-Shannon divergence, the teacher weighing beta in the mixture), on both distributions
    softened by the temperature and scaled by its square, so that the gradient keeps its size."""
    loss: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5

    def __call__(self, student_logprobs, teacher_logprobs):
        return divergence(student_logprobs, teacher_logprobs, self.loss, self.beta) * self.temperature ** 2


class Teacher:
    """A teacher model in memory: its final hidden states at the answer positions are computed per
    micro-batch (no gradients, inference dtype), its logits just in time, chunk by chunk, inside the
    student's loss. timed: wait for the device to measure the forward passes (seconds; the on-policy log)."""

    def __init__(self, name, student_tok, vocab_size, kd, device, teacher_device=None, cache_dir=None,
                 timed=False):
        self.device = teacher_device or device
        dtype = qwen3.pick_dtype("auto", self.device)
        self.model, tok = qwen3.load(name, student_tok.kind, self.device, dtype, cache_dir)
        if tok.vocabulary() != student_tok.vocabulary() or self.model.cfg.vocab_size != vocab_size:
            raise ValueError(f"teacher {name} has another tokenizer or vocabulary than the student: soft "
                             "distillation compares them token by token, so both must share one (two Qwen3 "
                             "models do)")
        self.kd, self.timed, self.seconds = kd, timed, 0.0
        self.head = self.model.lm_head.weight.to(device)  # one copy next to the student's head

    def targets(self, batch, input_ids, answers):
        start = time.time()
        with torch.no_grad():
            hidden = self.model.hidden_states(input_ids.to(self.device)).flatten(0, 1)
            hidden = hidden[answers.to(self.device)]
        hidden = hidden.to(self.head.device)
        if self.timed and str(self.device).startswith("cuda"):
            torch.cuda.synchronize(self.device)  # the time, not the time to queue the kernels
        self.seconds += time.time() - start
        return hidden

    def divergence(self, logits, hidden, rows):
        T = self.kd.temperature
        with torch.no_grad():
            teacher = F.log_softmax((hidden[rows].to(self.head.dtype) @ self.head.t()).float() / T, -1)
        return self.kd(F.log_softmax(logits / T, -1), teacher)


# An offline teacher: its top-k log-probabilities at every answer position, computed once (write_logits, the
# command python data.py teacher-logits) so that train.py --teacher_logits needs no teacher in memory. Per
# answer token: k token ids (int32), their log-probabilities (float16) and the log of the probability left to
# the rest of the vocabulary (float32): 6k + 4 bytes, 388 at k = 64.

LOGITS_FORMAT = "teacher-logits-v1"
PART_EXAMPLES = 256  # examples per part file: the unit of progress and of resume


class TeacherLogits:
    """A teacher-logits file, memory-mapped, for the data, tokenizer and formatting of `key`
    (data.examples_key). The KD term compares both distributions over k + 1 buckets: the k tokens, and the
    rest of the vocabulary as one, with the mass the teacher left there. That is exact when k covers the
    vocabulary; otherwise it only sees which of the k tokens the teacher preferred and how much it left to
    the rest (a biased, lower estimate of the full divergence)."""

    def __init__(self, path, key, kd=None, device="cpu"):
        try:
            state = torch.load(path, weights_only=True, mmap=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"teacher logits not found: {path}") from None
        except Exception as e:
            raise ValueError(f"{path}: not a teacher-logits file ({type(e).__name__})") from None
        if not isinstance(state, dict) or state.get("format") != LOGITS_FORMAT:
            raise ValueError(f"{path}: not a teacher-logits file (python data.py teacher-logits writes them)")
        if state["key"] != key:
            raise ValueError(f"{path} was computed for other data, tokenizer or formatting than this run "
                             "(--data_path, --which_model, --use_think_tokens): compute it again for this "
                             "run")
        self.path, self.ids, self.logprobs, self.rest = path, state["ids"], state["logprobs"], state["rest"]
        offsets = [0, *torch.cumsum(state["lengths"], 0).tolist()]
        self.spans = {row: (offsets[i], offsets[i + 1]) for i, row in enumerate(state["rows"].tolist())}
        self.top_k, self.kd, self.device = state["top_k"], kd, device

    def check_covers(self, examples):
        missing = [e["row"] for e in examples if e["row"] not in self.spans]
        if missing:
            raise ValueError(f"{self.path} has no teacher logits for {len(missing)} training examples (data "
                             f"rows {missing[:5]}...): compute it with the same --max_seq_len as this run")

    def example(self, row):
        """(ids, log-probabilities, log of the rest) at the answer positions of data row `row`'s example."""
        a, b = self.spans[row]
        return self.ids[a:b], self.logprobs[a:b], self.rest[a:b]

    def targets(self, batch, input_ids, answers):
        ids, logprobs, rest = zip(*(self.example(e["row"]) for e in batch))
        return [qwen3.to_device(torch.cat(x), self.device) for x in (ids, logprobs, rest)]

    def divergence(self, logits, targets, rows):
        T = self.kd.temperature
        ids, logprobs, rest = (x[rows] for x in targets)
        teacher = F.log_softmax(torch.cat([logprobs.float(), rest[:, None].float()], 1) / T, -1)
        student = F.log_softmax(logits / T, -1)
        student_rest = torch.logsumexp(student.scatter(1, ids.long(), torch.finfo(torch.float32).min), -1)
        return self.kd(torch.cat([student.gather(1, ids.long()), student_rest[:, None]], 1), teacher)


def read_logits(path, data_path, tokenizer, use_think_tokens, cache_dir=None, kd=None, device="cpu"):
    """The teacher-logits file for a run's data, tokenizer and formatting (an error if it is for others)."""
    key = data.examples_key(data.resolve_data_path(data_path, cache_dir), tokenizer, use_think_tokens)
    return TeacherLogits(path, key, kd, device)


@torch.no_grad()
def top_k(model, batch, k, device, chunk_size=512):
    """(ids [n, k], log-probabilities [n, k], log of the rest [n]) at the n answer positions of a batch."""
    input_ids, _, mask = data.collate(batch, device)
    hidden = model.hidden_states(input_ids)[mask]
    ids, logprobs, rest = [], [], []
    for s in range(0, len(hidden), chunk_size):
        chunk = torch.log_softmax((hidden[s:s + chunk_size] @ model.lm_head.weight.t()).float(), -1)
        top = chunk.topk(k, -1)
        ids.append(top.indices.int())
        logprobs.append(top.values.half())
        rest.append(torch.logsumexp(chunk.scatter(1, top.indices, -torch.inf), -1))  # -inf when k covers all
    return [torch.cat(x).cpu() for x in (ids, logprobs, rest)]


def write_logits(args):
    """The teacher-logits command: parts written as they complete (resume skips them), then one file."""
    device = qwen3.pick_device(args.device)
    model, teacher_tok = qwen3.load(args.teacher, args.which_model, device,
                                    qwen3.pick_dtype(args.dtype, device), args.cache_dir)
    tok = teacher_tok
    if args.tokenizer:
        tok = qwen3.load_tokenizer(args.tokenizer, args.which_model, args.cache_dir)
    if tok.vocabulary() != teacher_tok.vocabulary():
        raise ValueError(f"{args.teacher} and --tokenizer {args.tokenizer} have different vocabularies")
    if not 0 < args.top_k <= model.cfg.vocab_size:
        raise ValueError(f"--top_k must be in 1..{model.cfg.vocab_size}, got {args.top_k}")
    path = data.resolve_data_path(args.data_path, args.cache_dir)
    examples, _, _ = data.prepare_examples(path, tok, args.use_think_tokens, args.cache_dir)
    examples = data.filter_by_length(examples, args.max_seq_len)[0]
    header = {"format": LOGITS_FORMAT, "key": data.examples_key(path, tok, args.use_think_tokens),
              "teacher": str(args.teacher), "top_k": args.top_k}
    out, parts = Path(args.out), Path(args.out + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    tokens = sum(len(e["token_ids"]) - e["prompt_len"] for e in examples)
    size_mb = tokens * (6 * args.top_k + 4) / 1e6
    print(f"{len(examples)} examples, {tokens:,} answer tokens: {size_mb:,.1f} MB to write")
    bar = qwen3.Progress(len(examples), "teacher logits", unit="examples")
    for n, start in enumerate(range(0, len(examples), PART_EXAMPLES)):
        part_path, part = parts / f"{n:05d}.pt", examples[start:start + PART_EXAMPLES]
        if part_path.exists() and _part_header(part_path) == header:  # done by an earlier, interrupted run
            bar.update(len(part))
            continue
        results = {}
        for b in range(0, len(part), args.batch_size):  # similar lengths together: little padding
            batch = sorted(part, key=lambda e: len(e["token_ids"]))[b:b + args.batch_size]
            for e, *values in _split_by_example(batch, top_k(model, batch, args.top_k, device)):
                results[e["row"]] = values
            bar.update(len(batch))
        rows = [e["row"] for e in part]
        ids, logprobs, rest = (torch.cat([results[r][k] for r in rows]) for k in range(3))
        lengths = torch.tensor([len(results[r][2]) for r in rows])
        results = {**header, "rows": torch.tensor(rows), "ids": ids, "logprobs": logprobs, "rest": rest,
                   "lengths": lengths}
        qwen3.save_atomically(part_path, lambda tmp: torch.save(results, tmp))
    bar.close()
    loaded = [torch.load(parts / f"{n:05d}.pt", weights_only=True)
              for n in range(math.ceil(len(examples) / PART_EXAMPLES))]
    merged = {k: torch.cat([p[k] for p in loaded]) for k in ("rows", "ids", "logprobs", "rest", "lengths")}
    qwen3.save_atomically(out, lambda tmp: torch.save({**header, **merged}, tmp))
    for f in parts.iterdir():
        f.unlink()
    parts.rmdir()
    print(f"wrote {out} ({out.stat().st_size / 1e6:,.1f} MB)")


def _split_by_example(batch, values):
    """Cut per-position results into one piece per example of the batch."""
    lengths = [len(e["token_ids"]) - e["prompt_len"] for e in batch]
    return zip(batch, *(torch.split(v, lengths) for v in values))


def _part_header(path):
    try:
        part = torch.load(path, weights_only=True, mmap=True)
        return {k: part[k] for k in ("format", "key", "teacher", "top_k")}
    except Exception:
        return None  # damaged (cut off while written): computed again


# -----------------------------------------------------------------------------
# On-policy distillation (GKD, with lambda = the share on-policy): for a share of each step's examples the
# student writes its own answers, and the loss on them is the KD term alone, from the teacher's scores of
# every token the student wrote; the rest of the step learns from the teacher's text.


class Rollouts:
    """The student's answers for the chosen examples of a step: qwen3's batched generator (KV cache, no
    gradients), sampled from the student's own distribution at `temperature`. Each (epoch, example, sample)
    draws from its own seeded stream, and whether an example is chosen (with probability `share`) is its own
    draw too, so neither depends on the batch size or the number of processes, and a resumed run draws the
    same."""

    def __init__(self, student, tok, dtype, share, temperature=1.0, max_new_tokens=2048, samples=1, seed=0,
                 compiled=False):
        self.tok, self.share, self.samples, self.seed = tok, share, samples, seed
        self.max_new_tokens = max_new_tokens
        self.sampling = qwen3.Sampling(temperature=temperature, seed=seed)
        # Token by token, float32 master weights would mean true-float32 matmuls and a float32 KV cache: under
        # mixed precision the student answers from a copy of itself in the compute dtype (2 bytes a weight,
        # and the cache takes half), refreshed before each rollout. Compiled blocks would recompile for every
        # layer and cache layout (past torch.compile's limit): a compiled student answers from a copy too.
        weights = student.embed_tokens.weight
        copy = dtype != weights.dtype or compiled
        self.copy = qwen3.empty_model(student.cfg, weights.device, dtype) if copy else None

    def chosen(self, example, epoch):
        return random.Random(f"{self.seed}/{epoch}/{example['row']}").random() < self.share

    def answer(self, model, share, epoch):
        """The share [(batch, weight, written by the student)] with each chosen example of weight 1 replaced
        by the student's answers to it (`samples` of them), in micro-batches of their own; and their sums."""
        chosen = [(e, s) for batch, weight, _ in share if weight for e in batch if self.chosen(e, epoch)
                  for s in range(self.samples)]
        keys = [(epoch, e["row"], s) for e, s in chosen]
        prompts = [torch.as_tensor(e["token_ids"][:e["prompt_len"]]).tolist() for e, _ in chosen]
        start = time.time()
        student = getattr(model, "module", model)  # DDP's module: generating needs no gradient sync
        if self.copy is not None:
            with torch.no_grad():
                for mine, theirs in zip(self.copy.parameters(), student.parameters()):
                    mine.copy_(theirs)
        writer = (self.copy or student).eval()
        answers = qwen3.generate(writer, prompts, self.max_new_tokens, self.tok.eos_token_id,
                                 sampling=self.sampling, keys=keys) if prompts else []
        student.train()
        written = {}  # id of a chosen example -> the student's answers to it
        for (e, _), prompt, answer in zip(chosen, prompts, answers):
            ids = torch.tensor(prompt + answer, dtype=torch.int32)
            answer = {"token_ids": ids, "prompt_len": len(prompt), "row": e["row"]}
            written.setdefault(id(e), []).append(answer)
        new = []
        for batch, weight, _ in share:
            teacher_text = [e for e in batch if not weight or id(e) not in written]
            mine = [answer for e in batch if weight and id(e) in written for answer in written[id(e)]]
            new += [(teacher_text, weight, False)] if teacher_text else []
            new += [(mine, weight, True)] if mine else []
        eos = self.tok.eos_token_id
        stats = {"answers": len(answers), "tokens": sum(map(len, answers)), "kd": 0.0, "kd_per_token": 0.0,
                 "cut": sum(a[-1] != eos for a in answers), "rollout_s": time.time() - start,
                 "boxed": sum(checker.has_box(self.tok.decode(a)) for a in answers)}
        return new, stats
