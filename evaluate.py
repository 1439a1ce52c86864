"""
Greedy MATH-500 evaluation and a safe \\boxed{} answer checker.

    python evaluate.py --model Qwen/Qwen3-0.6B-Base --which_model base --out base.jsonl
    python evaluate.py --checkpoint_path out/qwen3-0.6B-distill-step06682-epoch1.pth --max_new_tokens 4096 --out e1.jsonl
    python evaluate.py --json_path teacher.json --gtruth_answer gtruth_answer --generated_text message_content

The checker never evaluates model text as code: answers are parsed by a small recursive-descent
parser into sympy objects, with limits on length, nesting, number sizes and powers, and a time limit.
"""
import argparse
import json
import math
import re
import signal
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import sympy
import torch

import data
import qwen3

# -----------------------------------------------------------------------------
# Extraction: the last \boxed{...} (or \fbox), else the last number


MAX_ANSWER_CHARS = 1000   # longer answers are compared as strings only
MAX_NUMBER_DIGITS = 200   # longer number literals are not parsed
MAX_DEPTH = 60            # parser nesting limit
MAX_RESULT_DIGITS = 400   # refuse powers / factorials whose value would be larger
TIME_LIMIT_S = 1.0        # per comparison, where a SIGALRM timer is available

RE_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def _braced(text, start):
    """Content of the {...} group opening at text[start], or None if unbalanced."""
    depth = 0
    for m in re.compile(r"[{}]").finditer(text, start):
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
            return text[start + 1:m.start()]
    return None


def extract_answer(text):
    """The final answer in a model output: the last \\boxed{..}/\\fbox{..}/\\boxed 5 (an earlier one if the
    last is unbalanced); with no box at all, a short bare answer or the last number. None: nothing to grade."""
    if not isinstance(text, str) or not text.strip():
        return None
    starts = sorted(m.end() for m in re.finditer(r"\\(?:boxed|fbox)", text))
    for end in reversed(starts[-3:]):  # the last one, or an earlier one if the last is unbalanced
        pos = re.compile(r"\s*").match(text, end).end()
        if text.startswith("{", pos):
            content = _braced(text, pos)
            if content is not None:
                return content.strip().strip("$").strip()
        elif pos > end:  # "\boxed 5": one space-separated token
            token = re.match(r"[^\s$]+", text[pos:])
            if token:
                return token.group()
    if starts:
        return None  # boxed, but never closed: no answer rather than a guess
    bare = text.strip().strip("$").strip().rstrip(".")
    if len(bare) <= 60 and "\n" not in bare and not re.search(r"[a-zA-Z]{4,}", re.sub(r"\\[a-zA-Z]+", "", bare)):
        return bare  # a short answer given without \boxed, e.g. "\frac{1}{2}"
    numbers = RE_NUMBER.findall(text)
    return numbers[-1] if numbers else None


# -----------------------------------------------------------------------------
# Normalisation of LaTeX answers (string level)

UNIT_WORDS = ("units", "unit", "sq", "square", "cubic", "cm", "centimeters", "meters", "km", "kilometers", "mm",
              "inches", "inch", "in", "feet", "foot", "ft", "yards", "miles", "mph", "degrees", "degree", "dollars",
              "cents", "hours", "hour", "minutes", "minute", "seconds", "second", "days", "day", "weeks", "years",
              "pounds", "ounces", "grams", "kg", "liters", "people", "ways", "points", "students", "cups")
RE_UNITS = re.compile(r"^(.*?\d[^a-zA-Z]*?)(?:(?:\^?\{?[23]\}?)?(?:" + "|".join(UNIT_WORDS) + r")\b\.?)+(?:\^?\{?[23]\}?)?$")


def normalize(answer):
    """A canonical string for a LaTeX answer: wrappers, spacing, units, degrees, %, $ removed."""
    s = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", answer)
    s = re.sub(r"<\|[^|>]{1,30}\|>", "", s)
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = s.replace("\\!", "")  # negative thin space, as in 10,\!080
    s = re.sub(r"(?<!\\)\\(?:displaystyle|limits|,|;|:|quad|qquad|\s)(?![a-zA-Z])|~", " ", s)  # not the \\ of rows
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\circ|\\degree", "", s)
    s = re.sub(r"\\?%|\\?\$|(?<!\\)\\[()\[\]]", "", s)
    for _ in range(5):  # unwrap \text{..} and friends, innermost first
        s = re.sub(r"\\(?:text|textbf|textit|textnormal|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    s = s.replace("{,}", ",").replace("\\dots", "").replace("\\ldots", "")
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    s = re.sub(r"^(?:the answer is|answer:)\s*", "", s, flags=re.I)
    units = RE_UNITS.match(s)
    if units and units.group(1).strip():
        s = units.group(1).strip()
    if not s.startswith(("(", "[")):  # thousands separators (not in tuples / intervals): 10,080 -> 10080
        s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    s = s.replace(" ", "")
    s = re.sub(r"_\{(\w+)\}", r"_\1", s)  # 1011_{2} is 1011_2
    s = re.sub(r"^[a-zA-Z]\\in(?![a-zA-Z])", "", s)  # x \in [2, 5) is [2, 5)
    mixed = re.fullmatch(r"(-?)(\d+)\\frac\{?(\d)\}?\{?(\d)\}?|(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}", s)
    if mixed:  # 1\frac{4}{5} is one and four fifths
        g = [x for x in mixed.groups() if x is not None]
        s = f"{g[0]}({g[1]}+\\frac{{{g[2]}}}{{{g[3]}}})"
    choice = re.fullmatch(r"\(?([A-Ea-e])\)", s) or re.fullmatch(r"\(([A-Ea-e])\)?", s)
    if choice:  # multiple choice: (C), C), (c
        return choice.group(1).upper()
    while (pair := _outer_pair(s)) and pair[:2] == ("(", ")") and len(_split_top(pair[2], ",")) == 1:
        s = pair[2]  # (x = 5) is x = 5; a tuple or interval keeps its brackets
    return s


# -----------------------------------------------------------------------------
# A small LaTeX math parser producing sympy objects (never eval / sympify / parse_expr)


class ParseError(ValueError):
    pass


TOKEN = re.compile(r"\d+\.?\d*|\.\d+|\\[a-zA-Z]+|[a-zA-Z]|[-+*/^()\[\]{}!|_=,&']|\\\\|\\\{|\\\}|\S")
GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta", "iota",
         "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi", "chi", "psi", "omega"}
FUNCTIONS = {"sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec, "csc": sympy.csc,
             "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan, "ln": sympy.log, "exp": sympy.exp,
             "sinh": sympy.sinh, "cosh": sympy.cosh, "tanh": sympy.tanh}
CONSTANTS = {"pi": sympy.pi, "infty": sympy.oo, "infinity": sympy.oo}


def _magnitude_digits(x):
    """Decimal digits of a numeric sympy value (rough), for size limits."""
    try:
        v = abs(complex(sympy.N(x, 15)))
    except (TypeError, ValueError, OverflowError):
        return math.inf
    return math.log10(v) if v > 0 else 0.0


def _safe_pow(base, exp):
    if exp.is_number and base.is_number:
        e = abs(complex(sympy.N(exp, 15)))
        b = abs(complex(sympy.N(base, 15))) if _magnitude_digits(base) < 1e6 else math.inf
        if b not in (0.0, 1.0) and e * abs(math.log10(b) if b != math.inf else math.inf) > MAX_RESULT_DIGITS:
            raise ParseError("power too large")
    elif exp.is_number and (not exp.is_finite or abs(complex(sympy.N(exp, 15))) > 60):
        raise ParseError("symbolic power too large")
    return sympy.Pow(base, exp)


class Parser:
    """expr := term (+|- term)* ; term := unary ((*|/|implicit) unary)* ; unary := (+|-) unary | power ;
    power := postfix (^ exponent)? ; postfix := atom !* ; atom := number | letter | constant | (expr) | {expr} |
    \\frac{a}{b} | \\sqrt[n]{x} | function arg | |expr|"""

    def __init__(self, text):
        if len(text) > MAX_ANSWER_CHARS:
            raise ParseError("answer too long")
        self.tokens = TOKEN.findall(text)
        self.i, self.depth = 0, 0

    def peek(self, k=0):
        return self.tokens[self.i + k] if self.i + k < len(self.tokens) else None

    def take(self, expected=None):
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise ParseError(f"expected {expected!r}, got {tok!r}")
        self.i += 1
        return tok

    def parse(self):
        value = self.expr()
        if self.peek() is not None:
            raise ParseError(f"unexpected {self.peek()!r}")
        return value

    def nest(self):
        """Count one level of recursion: pathological nesting is a parse error, not a RecursionError."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ParseError("nested too deeply")

    def expr(self):
        self.nest()
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        self.depth -= 1
        return value

    def starts_atom(self, tok):
        return tok is not None and (tok[0].isdigit() or tok[0] == "." or tok.isalpha() or tok in ("(", "{", "\\sqrt", "\\frac")
                                    or (tok[0] == "\\" and tok[1:] in GREEK | set(FUNCTIONS) | set(CONSTANTS) | {"log"}))

    def term(self):
        value = self.unary()
        while True:
            tok = self.peek()
            if tok in ("*", "\\cdot", "\\times"):
                self.take()
                value = value * self.unary()
            elif tok in ("/", "\\div"):
                self.take()
                value = value / self.unary()
            elif self.starts_atom(tok):  # implicit multiplication: 2x, 3\pi, 2\sqrt{3}, (a+1)(b+2)
                value = value * self.power()
            else:
                return value

    def unary(self):
        if self.peek() in ("+", "-"):
            self.nest()
            sign = self.take()
            value = self.unary()
            self.depth -= 1
            return -value if sign == "-" else value
        return self.power()

    def power(self):
        base = self.postfix()
        if self.peek() == "^":
            self.take()
            return _safe_pow(base, self.exponent())
        return base

    def exponent(self):
        tok = self.peek()
        if tok in ("-", "+"):
            self.take()
            value = self.exponent()
            return -value if tok == "-" else value
        if tok is not None and tok[0].isdigit() and len(tok) > 1 and "." not in tok:
            self.tokens[self.i] = tok[1:]  # x^23 in LaTeX is x^2 times 3
            return sympy.Integer(tok[0])
        return self.postfix()

    def postfix(self):
        value = self.atom()
        while self.peek() == "!":
            self.take()
            if not (value.is_Integer and 0 <= value <= 300):
                raise ParseError("factorial of a large or non-integer value")
            value = sympy.factorial(value)
        return value

    def group(self, open_tok, close_tok):
        self.take(open_tok)
        value = self.expr()
        self.take(close_tok)
        return value

    def argument(self):
        """A LaTeX macro argument: {expr} or a single token (\\frac12, \\sqrt2)."""
        tok = self.peek()
        if tok == "{":
            return self.group("{", "}")
        if tok is not None and tok[0].isdigit():
            self.take()
            if len(tok) > 1 and "." not in tok:
                self.tokens.insert(self.i, tok[1:])
            return sympy.Integer(tok[0])
        return self.atom()

    def atom(self):
        tok = self.peek()
        if tok is None:
            raise ParseError("unexpected end")
        if tok[0].isdigit() or tok[0] == ".":
            self.take()
            if len(tok) > MAX_NUMBER_DIGITS:
                raise ParseError("number too long")
            return sympy.Rational(tok)  # decimals stay exact: 0.5 == 1/2, 0.333 != 1/3
        if tok == "(":
            return self.group("(", ")")
        if tok == "{":
            return self.group("{", "}")
        if tok == "[":
            return self.group("[", "]")
        if tok == "|":
            return sympy.Abs(self.group("|", "|"))
        if tok == "\\frac":
            self.take()
            num = self.argument()
            return num / self.argument()
        if tok == "\\sqrt":
            self.take()
            index = sympy.Integer(2)
            if self.peek() == "[":
                index = self.group("[", "]")
            return _safe_pow(self.argument(), 1 / index)
        if tok.isalpha() and len(tok) == 1:
            self.take()
            return sympy.I if tok == "i" else sympy.Symbol(tok)
        name = tok[1:]
        if name in CONSTANTS:
            self.take()
            return CONSTANTS[name]
        if name in GREEK:
            self.take()
            return sympy.Symbol(name)
        if name in FUNCTIONS or name == "log":
            self.take()
            log_base = None
            if name == "log" and self.peek() == "_":
                self.take()
                log_base = self.argument()
            power = None
            if self.peek() == "^":  # \sin^2 x
                self.take()
                power = self.exponent()
            arg = self.power()
            value = sympy.log(arg, log_base) if name == "log" and log_base is not None else \
                sympy.log(arg) if name == "log" else FUNCTIONS[name](arg)
            return _safe_pow(value, power) if power is not None else value
        raise ParseError(f"unknown token {tok!r}")


def parse_math(text):
    """A sympy expression for a normalised answer string; ParseError when it is not plain math."""
    return Parser(text).parse()


# -----------------------------------------------------------------------------
# Structure: tuples, intervals, sets, lists, matrices, equations, ±


def _split_top(s, sep):
    """Split on sep outside any brackets."""
    parts, depth, last = [], 0, 0
    i = 0
    while i < len(s):
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[last:i])
            last = i + len(sep)
            i = last
            continue
        i += 1
    parts.append(s[last:])
    return parts


def _outer_pair(s):
    """(open, close, inner) when s is one bracketed group like (a,b], \\{a,b\\}, [a,b); else None."""
    m = re.fullmatch(r"(\\\{|[(\[])(.*)(\\\}|[)\]])", s)
    if not m:
        return None
    depth = 0
    for c in m.group(2):  # the first bracket must close only at the very end
        depth += (c in "([{") - (c in ")]}")
        if depth < 0:
            return None
    return (m.group(1), m.group(3), m.group(2)) if depth == 0 else None


def structure(s):
    """(kind, payload) for a normalised answer."""
    if "\\cup" in s:
        return "union", s.split("\\cup")
    matrix = re.fullmatch(r"\\begin\{[pbv]?matrix\}(.*)\\end\{[pbv]?matrix\}", s)
    if matrix:
        return "matrix", [row.split("&") for row in matrix.group(1).split("\\\\") if row]
    pair = _outer_pair(s)
    if pair and len(_split_top(pair[2], ",")) > 1:
        items = _split_top(pair[2], ",")
        return ("set", items) if pair[0] == "\\{" else ("seq", (pair[0] + pair[1], items))
    if pair and pair[0] == "\\{":
        return "set", [pair[2]]
    items = _split_top(s, ",")
    if len(items) > 1:
        return "list", [_strip_lhs(item) for item in items]  # x=1, x=2 lists the values 1 and 2
    if s.count("\\pm") == 1:
        return "list", [s.replace("\\pm", "+"), s.replace("\\pm", "-")]
    if "=" in s:
        return "eq", s.split("=")
    return "expr", s


def scalar_equal(a, b):
    """Are two normalised scalar answers mathematically equal?"""
    if a == b or a.lower() == b.lower():
        return True
    try:
        x, y = parse_math(a), parse_math(b)
    except (ParseError, ZeroDivisionError, TypeError, ValueError):
        return False
    return _sympy_equal(x, y)


def _sympy_equal(x, y):
    if x == y:
        return True
    if x.has(sympy.nan, sympy.zoo) or y.has(sympy.nan, sympy.zoo):
        return False
    free = x.free_symbols | y.free_symbols
    if not free:
        if x.is_Rational and y.is_Rational:  # decimals and fractions compare exactly: 0.333 != 1/3
            return False
        # an exact expression (root, pi, log) equal to the other side to 30 significant digits
        return abs(complex(sympy.N(x - y, 60))) <= 1e-30 * max(1.0, abs(complex(sympy.N(x, 30))))
    if sympy.expand(x - y) == 0:
        return True
    for point in (0.5813, 1.3721, -0.7345, 2.1187):  # identical values at several points
        subs = {s: sympy.Float(point + 0.1 * k, 30) for k, s in enumerate(sorted(free, key=str))}
        value = complex(sympy.N((x - y).xreplace(subs), 30))
        scale = max(1.0, abs(complex(sympy.N(x.xreplace(subs), 30))))
        if not abs(value) <= 1e-9 * scale:
            return False
    return True


def _same_multiset(xs, ys):
    if len(xs) != len(ys):
        return False
    unused = list(ys)
    for x in xs:
        match = next((k for k, y in enumerate(unused) if scalar_equal(x, y)), None)
        if match is None:
            return False
        unused.pop(match)
    return True


def _strip_lhs(s):
    """'x=3' -> '3' when the left side is a single variable; anything else unchanged."""
    m = re.fullmatch(r"(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?=(.+)", s)
    return m.group(1) if m and "=" not in m.group(1) else s


def _equations_equal(a, b):
    """a = b and c = d are equal when (a - b) is a non-zero constant multiple of (c - d)."""
    try:
        x = parse_math(a[0]) - parse_math(a[1])
        y = parse_math(b[0]) - parse_math(b[1])
    except (ParseError, ZeroDivisionError, TypeError, ValueError):
        return False
    if y == 0 or x == 0:
        return x == y
    ratio = sympy.cancel(x / y)
    return bool(ratio.is_number and ratio != 0)


def answers_equal(pred, ref):
    """Compare two extracted answers (strings), structure first, then values."""
    if max(len(pred), len(ref)) > MAX_ANSWER_CHARS:  # no answer is this long: compare as text, in linear time
        return pred.strip() == ref.strip()
    a, b = normalize(pred), normalize(ref)
    if a == b:
        return True
    if "=" in a and "=" not in b:
        a = _strip_lhs(a)
    elif "=" in b and "=" not in a:
        b = _strip_lhs(b)
    (ka, pa), (kb, pb) = structure(a), structure(b)
    if ka == "matrix" and kb == "seq" and all(len(r) == 1 for r in pa):  # column vector written as a tuple
        ka, pa = "seq", (pb[0], [r[0] for r in pa])
    if kb == "matrix" and ka == "seq" and all(len(r) == 1 for r in pb):
        kb, pb = "seq", (pa[0], [r[0] for r in pb])
    if ka != kb:  # a bare list of solutions may come back as a set or in parentheses: order is not asked for
        items = lambda kind, payload: payload[1] if kind == "seq" else payload
        unordered = {"list", "set", "seq"}
        return ka in unordered and kb in unordered and "list" in (ka, kb) and _same_multiset(items(ka, pa), items(kb, pb))
    if ka == "expr":
        return scalar_equal(pa, pb)
    if ka == "seq":
        return pa[0] == pb[0] and len(pa[1]) == len(pb[1]) and all(map(scalar_equal, pa[1], pb[1]))
    if ka in ("list", "set"):
        return _same_multiset(pa, pb)
    if ka == "matrix":
        return [len(r) for r in pa] == [len(r) for r in pb] and all(
            scalar_equal(x, y) for ra, rb in zip(pa, pb) for x, y in zip(ra, rb))
    if ka == "union":
        return len(pa) == len(pb) and all(map(answers_equal, pa, pb))
    if ka == "eq":
        return len(pa) == len(pb) == 2 and _equations_equal(pa, pb)
    return False


@contextmanager
def time_limit(seconds):
    """Raise TimeoutError after `seconds` (a SIGALRM timer: main thread on Unix only; elsewhere no-op)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return
    def on_alarm(signum, frame):
        raise TimeoutError
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def grade(extracted, reference):
    """True when an extracted answer equals the reference. Never raises, never runs model text."""
    if not isinstance(extracted, str) or not isinstance(reference, str):
        return False
    try:
        with time_limit(TIME_LIMIT_S):
            return bool(answers_equal(extracted, reference))
    except (Exception, TimeoutError):  # pathological input (too big, too deep, too slow) is simply wrong
        return False


def is_correct(model_output, reference):
    """Grade a model's full output against a reference answer."""
    return grade(extract_answer(model_output), reference)


# -----------------------------------------------------------------------------
# Running an evaluation


def wilson_interval(correct, n, z=1.96):
    """95% confidence interval of an accuracy (Wilson score), as (low, high)."""
    if n == 0:
        return 0.0, 0.0
    p = correct / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))  # clamp rounding


def summarize(records, wall_time_s=None, **info):
    """Accuracy with CI, by subject and level, response lengths and truncation."""
    n = len(records)
    correct = sum(r["correct"] for r in records)
    low, high = wilson_interval(correct, n)
    summary = {"accuracy": correct / n if n else 0.0, "num_correct": correct, "num_examples": n, "ci95": [low, high]}
    for key in ("subject", "level"):
        groups = defaultdict(list)
        for r in records:
            groups[str(r.get(key))].append(r["correct"])
        summary[f"by_{key}"] = {k: {"accuracy": sum(v) / len(v), "num_correct": sum(v), "num_examples": len(v)}
                                for k, v in sorted(groups.items())}
    if records and "num_tokens" in records[0]:
        tokens = sum(r["num_tokens"] for r in records)
        summary.update(avg_response_tokens=tokens / n, truncated_share=sum(r["truncated"] for r in records) / n)
        if wall_time_s:
            summary.update(wall_time_s=wall_time_s, tokens_per_sec=tokens / wall_time_s)
    return {**summary, **info}


def print_summary(s):
    print(f"accuracy: {100 * s['accuracy']:.1f}% ({s['num_correct']}/{s['num_examples']}), "
          f"95% CI {100 * s['ci95'][0]:.1f}-{100 * s['ci95'][1]:.1f}%")
    for key in ("by_subject", "by_level"):
        print(f"  {key[3:]:>8}: " + ", ".join(f"{k} {100 * v['accuracy']:.0f}% ({v['num_correct']}/{v['num_examples']})"
                                               for k, v in s[key].items()))
    if "avg_response_tokens" in s:
        print(f"  average response {s['avg_response_tokens']:.0f} tokens, {100 * s['truncated_share']:.1f}% hit max_new_tokens"
              + (f", {s['wall_time_s']:.0f} s, {s['tokens_per_sec']:.0f} tokens/s" if "wall_time_s" in s else ""))


def read_records(path):
    """Records of a previous run; a truncated last line (an interrupted write) is dropped."""
    records = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):
                raise ValueError(f"{path}: line {n} is not valid JSON (only the last line may be cut off)") from None
            print(f"dropping the truncated last line of {path}", file=sys.stderr)
    return records


def grade_file(args):
    """--json_path mode: grade existing generations, no model."""
    rows = data.read_rows(args.json_path)
    missing = [f for f in (args.gtruth_answer, args.generated_text) if not isinstance(rows[0], dict) or f not in rows[0]]
    if missing:
        raise ValueError(f"{args.json_path}: rows have no field {missing[0]!r} (fields: {sorted(rows[0]) if isinstance(rows[0], dict) else '-'})")
    records = []
    for i, row in enumerate(rows):
        text, ref = row.get(args.generated_text), row.get(args.gtruth_answer)
        extracted = extract_answer(text) if isinstance(text, str) else None
        records.append({"index": i, "subject": row.get("subject"), "level": row.get("level"), "gtruth_answer": ref,
                        "generated_text": text, "extracted": extracted, "correct": grade(extracted, str(ref))})
    return records


def cross_check(records):
    """Grade again with HuggingFace math-verify (optional) and list disagreements."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise ValueError("--cross_check needs the optional package math-verify (pip install math-verify)") from None
    disagreements = []
    for r in records:
        try:
            theirs = bool(verify(parse(f"${r['gtruth_answer']}$"), parse(r["generated_text"] or "")))
        except Exception:
            theirs = False
        if theirs != r["correct"]:
            disagreements.append(r)
            print(f"  [{r['index']}] ours {r['correct']}, math-verify {theirs}: extracted {r['extracted']!r}, "
                  f"reference {r['gtruth_answer']!r}")
    print(f"math-verify disagrees on {len(disagreements)} of {len(records)}")


def make_record(index, row, ids, tok):
    finished = bool(ids) and ids[-1] == tok.eos_token_id
    text = tok.decode(ids[:-1] if finished else ids)
    extracted = extract_answer(text)
    return {"index": index, "unique_id": row.get("unique_id"), "subject": row.get("subject"), "level": row.get("level"),
            "problem": row["problem"], "gtruth_answer": row.get("answer"), "generated_text": text,
            "extracted": extracted, "correct": grade(extracted, str(row.get("answer"))),
            "num_tokens": len(ids), "truncated": not finished}


def generate_records(args, rows, done, out_file):
    """Generate, grade and append a record for every row not in `done`; returns (records, seconds)."""
    device = qwen3.pick_device(args.device)
    dtype = qwen3.pick_dtype(args.dtype, device)
    model, tok = qwen3.load_for_inference(args.model, args.which_model, args.checkpoint_path, device, dtype, args.cache_dir)
    print(f"device {device} ({dtype}), model {args.checkpoint_path or args.model}, tokenizer {tok.kind}, "
          f"{len(rows) - len(done)} problems to generate (batch {args.batch_size}, max_new_tokens {args.max_new_tokens})")
    todo = [i for i in range(len(rows)) if i not in done]
    prompts = {i: tok.encode(data.render_prompt(rows[i]["problem"])) for i in todo}
    todo.sort(key=lambda i: len(prompts[i]))  # similar lengths are admitted together: less prefill padding
    bar = qwen3.Progress(len(todo), "generate", unit="problems")
    start, records, answers = time.time(), [], {}
    stream = qwen3.generate_stream(model, [prompts[i] for i in todo], args.max_new_tokens, tok.eos_token_id,
                                   batch_size=args.batch_size)
    try:
        for j, token, finished in stream:  # a record is written as soon as its answer is complete
            answers.setdefault(j, []).append(token)
            if finished:
                record = make_record(todo[j], rows[todo[j]], answers.pop(j), tok)
                out_file.write(json.dumps(record, ensure_ascii=False) + "\n")
                out_file.flush()
                records.append(record)
                bar.update(1)
    except (torch.OutOfMemoryError, KeyboardInterrupt) as stop:
        why = ("error: out of memory (the KV cache holds batch_size x (longest prompt + max_new_tokens) positions): "
               "lower --batch_size" if isinstance(stop, torch.OutOfMemoryError) else "interrupted")
        raise SystemExit(f"{why}; the {len(records)} finished problems are kept in {out_file.name}, "
                         "continue with --resume") from None
    bar.close()
    return records, time.time() - start


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Greedy MATH-500 evaluation with a safe \\boxed{} answer checker.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default="Qwen/Qwen3-0.6B-Base", help="Hub repo id, local HF-layout directory, or 'tiny'")
    a("--which_model", default="base", choices=["base", "reasoning"], help="tokenizer variant (chat template and eos)")
    a("--checkpoint_path", default=None, help="a checkpoint of train.py: model and tokenizer come from it alone")
    a("--data_path", default=None, help="a file in the MATH-500 schema (default: MATH-500, downloaded once)")
    a("--dataset_size", type=int, default=None, help="evaluate only the first N problems")
    a("--max_new_tokens", type=int, default=2048, help="the reference used 4096 for distilled models")
    a("--batch_size", type=int, default=16,
      help="problems generated together; a finished one's slot takes the next problem (answers equal batch size 1)")
    a("--device", default="auto", help="auto = cuda, then mps, then cpu")
    a("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="auto = bfloat16 on cuda, else float32")
    a("--out", default="math500.jsonl", help="records, one JSON line per problem; the summary goes to OUT.summary.json")
    a("--resume", action="store_true", help="continue a partial --out file: only unfinished problems are generated")
    a("--json_path", default=None, help="grade existing generations in this JSON/JSONL file instead (no model)")
    a("--gtruth_answer", default="gtruth_answer", help="with --json_path: the field holding the reference answer")
    a("--generated_text", default="generated_text", help="with --json_path: the field holding the generated text")
    a("--cross_check", action="store_true", help="also grade with math-verify (optional package) and list disagreements")
    a("--cache_dir", default=None, help="downloads (default $DISTILL_CACHE or ~/.cache/reasoning-distill)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    summary_path = out.with_suffix(".summary.json") if out.suffix == ".jsonl" else Path(str(out) + ".summary.json")
    if args.json_path:
        records, info = grade_file(args), {"json_path": args.json_path}
        wall = None
    else:
        rows = data.load_math500(args.data_path, args.cache_dir)[:args.dataset_size]
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict) or not isinstance(r.get("problem"), str)
                    or "answer" not in r), None)
        if bad is not None:
            raise ValueError(f"{args.data_path or 'MATH-500'}: row {bad} lacks a 'problem' string or an 'answer' (MATH-500 schema)")
        if out.exists() and out.stat().st_size and not args.resume:
            raise ValueError(f"{out} exists: add --resume to continue it, or choose another --out")
        previous = read_records(out) if args.resume and out.exists() else []
        with open(out, "w", encoding="utf-8") as f:  # rewrite without a cut-off last line, then append
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in previous)
        if previous:
            print(f"resuming: {len(previous)} problems already in {out}")
        with open(out, "a", encoding="utf-8") as f:
            new, wall = generate_records(args, rows, {r["index"] for r in previous}, f)
        records = sorted(previous + new, key=lambda r: r["index"])
        info = {"model": args.checkpoint_path or args.model, "max_new_tokens": args.max_new_tokens,
                "data_path": args.data_path or "MATH-500"}
    summary = summarize(records, wall, **info)
    print_summary(summary)
    summary_path.write_text(json.dumps(summary, indent=2))
    print(f"wrote {summary_path}" + ("" if args.json_path else f" and {out}"))
    if args.cross_check:
        cross_check(records)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, qwen3.DownloadError) as err:
        sys.exit(f"error: {err}")
