"""
MATH-500 evaluation: generate answers (greedy, or sampled with error bars) and grade them with a safe checker.

    python evaluate.py generate --model Qwen/Qwen3-0.6B-Base --which_model base --out runs/base.jsonl
    python evaluate.py generate --checkpoint_path runs/r1 --max_new_tokens 4096 --out runs/r1.jsonl
    python evaluate.py generate --checkpoint_path runs/r1 --preset thinking --num_samples 4 --out s4.jsonl
    python evaluate.py grade teacher.json --gtruth_answer gtruth_answer --generated_text message_content
    torchrun --standalone --nproc_per_node 8 evaluate.py generate ...   (the problems split over 8 GPUs)

The checker (part 1) never evaluates model text as code: answers are parsed by a small recursive-descent
parser into sympy objects, with limits on length, nesting, number sizes and powers, and a time limit.
"""
import ctypes
import itertools
import json
import math
import queue
import re
import shlex
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sympy
import torch

import data
import qwen3

# =============================================================================
# Part 1: the answer checker. extract_answer finds the final answer in a model's text, normalize writes it
# canonically, Parser reads it as math, answers_equal compares two answers; grade wraps that in a time limit.
# Where an answer is ambiguous, the comments say which reading a human grader of MATH would choose, and why.

MAX_ANSWER_CHARS = 1000   # longer answers are compared as strings only
MAX_NUMBER_DIGITS = 200   # longer number literals are not parsed
MAX_DEPTH = 60            # parser nesting limit
MAX_RESULT_DIGITS = 400   # refuse powers / factorials whose value would be larger
MAX_BOXES = 100           # unbalanced boxes passed over, looking back for boxes to join
TIME_LIMIT_S = 1.0        # per answer graded, extraction included, in any thread

# -----------------------------------------------------------------------------
# Extraction

# a number standing on its own: not the 7 of "QX7ZB", not the 2 of "x2"
RE_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?(?![\w])")
# what may stand between boxes that together give one answer: \boxed{2} and \boxed{3}; \boxed{1},\boxed{2};
# x = \boxed{1}, y = \boxed{2}
RE_BETWEEN_BOXES = re.compile(r"(?:\s|[,;$.]|\\[()\[\],;]|\\q?quad|\\text\{\s*(?:and|or|,)\s*\}"
                              r"|\b(?:and|or)\b|\b[a-zA-Z](?:_\{?\w+\}?)?\s*=)*")
# "The final answer is $\frac{2}{7}$." (Minerva style), "Final Answer: the largest $n$ is 34."
RE_ANSWER_IS = re.compile(r"(?:final answer|the answer)(?: is|:)", re.I)
RE_MATH = re.compile(r"\$\$(.+?)\$\$|\\\[(.+?)\\\]|\$([^$\n]+?)\$|\\\((.+?)\\\)", re.S)
RE_BRACE, RE_SPACES, RE_TOKEN = re.compile(r"[{}]"), re.compile(r"\s*"), re.compile(r"[^\s$]+")


def _braced(text, start, limit=None):
    """Content of the {...} group opening at text[start]; None if it does not close (within `limit`
    characters when given)."""
    depth = 0
    end = len(text) if limit is None else min(len(text), start + limit + 2)
    for m in RE_BRACE.finditer(text, start, end):
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
            return text[start + 1:m.start()]
    return None


def _boxes_from_end(text):
    """(start, end, content) of each \\boxed{..} / \\fbox{..} / \\boxed 5, the last first; content None when
    unbalanced. Found by searching backwards and read only as far as a box's own closing brace (at most
    MAX_ANSWER_CHARS on), so a caller that stops after a few boxes reads a few boxes' worth of text, however
    long the answer or deep its nesting."""
    found = {name: text.rfind(name) for name in ("\\boxed", "\\fbox")}
    while (start := max(found.values())) >= 0:
        name = max(found, key=found.get)
        found[name] = text.rfind(name, 0, start)
        pos = RE_SPACES.match(text, start + len(name)).end()
        if text.startswith("{", pos):
            content = _braced(text, pos, MAX_ANSWER_CHARS)
            yield start, pos + len(content or "") + 2, content
        elif pos > start + len(name):  # "\boxed 5": one space-separated token
            token = RE_TOKEN.match(text, pos, pos + MAX_ANSWER_CHARS)
            yield start, token.end() if token else pos, token and token.group()


def has_box(text):
    return re.search(r"\\(?:boxed|fbox)", text) is not None


def extract_answer(text):
    """The final answer in a model output, None if there is nothing to grade:
    1. the last \\boxed{..} (an earlier one of the last three if it is unbalanced), joined with the boxes
       just before it when only separators stand between them ("\\boxed{2} and \\boxed{3}" is the list 2, 3),
       unless a "the final answer is" comes after it;
    2. without a box, the sentence after the last "the final answer is" / "the answer is" (else the whole
       text), and in it: all of it if it is a short bare answer ("\\frac{1}{2}"), else whichever comes last of
       the math in $..$, \\(..\\), \\[..\\] and the numbers standing on their own, in its last
       MAX_ANSWER_CHARS characters.
    A box that does not close within MAX_ANSWER_CHARS characters counts as unbalanced. Linear in the text's
    length: boxes are read from the end, and only as many as the answer needs."""
    if not isinstance(text, str) or not text.strip():
        return None
    boxes, stated = _boxes_from_end(text), list(RE_ANSWER_IS.finditer(text))
    last = list(itertools.islice(boxes, 3))
    closed = [b for b in last if b[2] is not None]
    if closed and not (stated and stated[-1].start() > closed[0][1]):  # "the final answer is" after it wins
        group, length, passed = [closed[0]], len(closed[0][2]), 0
        for box in itertools.chain(last[last.index(closed[0]) + 1:], boxes):
            if box[2] is None or box[1] > group[-1][0]:  # unbalanced, or around the group: look further back
                passed += 1
                if passed > MAX_BOXES:
                    break
                continue
            if group[-1][0] - box[1] > 200 or not RE_BETWEEN_BOXES.fullmatch(text, box[1], group[-1][0]):
                break
            group.append(box)
            length += len(box[2]) + 2
            if length > MAX_ANSWER_CHARS:  # longer than any answer: it will be compared as text
                break
        return ", ".join(b[2].strip().strip("$").strip() for b in reversed(group))
    if last and not closed:
        return None  # boxed, but never closed: no answer rather than a guess
    if stated:  # the rest of that sentence
        text = re.split(r"\.(?:\s|$)|\n\n|I hope", text[stated[-1].end():])[0]
    bare = text.strip().rstrip(".")
    if stated:  # The final answer is "$12$ and $13$": its dollars and quotes are not part of the answer
        bare = re.sub(r'\\?\$|\\?"', "", bare).strip()
    if len(bare) <= 60 and "\n" not in bare and "$" not in bare and \
            not re.search(r"[a-zA-Z]{4,}", re.sub(r"\\[a-zA-Z]+", "", bare)):
        return bare or None
    text = text[-MAX_ANSWER_CHARS:]  # the math regexes are quadratic on unclosed delimiters: a bounded tail
    maths = [(m.start(), next(g for g in m.groups() if g).strip()) for m in RE_MATH.finditer(text)]
    outside = RE_MATH.sub(lambda m: " " * len(m.group()), text)  # numbers inside math belong to the math
    numbers = [(m.start(), m.group()) for m in RE_NUMBER.finditer(outside)]
    return max(maths + numbers)[1] if maths or numbers else None


# -----------------------------------------------------------------------------
# Normalisation of LaTeX answers (string level)

UNIT_WORDS = ("units", "unit", "sq", "square", "cubic", "cm", "centimeters", "meters", "km", "kilometers",
              "mm", "inches", "inch", "in", "feet", "foot", "ft", "yards", "miles", "mph", "degrees",
              "degree", "dollars", "cents", "hours", "hour", "minutes", "minute", "seconds", "second", "days",
              "day", "weeks", "years", "pounds", "ounces", "grams", "kg", "liters", "people", "ways",
              "points", "students", "cups", "grade")
RE_UNITS = re.compile(r"^(.*?\d[^a-zA-Z]*?)(?:(?:\^?\{?[23]\}?)?(?:" + "|".join(UNIT_WORDS)
                      + r")\b\.?)+(?:\^?\{?[23]\}?)?$")
RELATIONS = [(r"\\leq(?:slant)?|\\le(?![a-zA-Z])|≤|=<", "<="),
             (r"\\geq(?:slant)?|\\ge(?![a-zA-Z])|≥|=>", ">="),
             (r"\\neq?(?![a-zA-Z])|≠", "!="), (r"\\lt(?![a-zA-Z])", "<"), (r"\\gt(?![a-zA-Z])", ">")]
# plain-text math, common in base models' answers: sqrt(7), 5pi, 300/pi, sin(x)
BARE_WORDS = [(r"(?<![a-zA-Z\\])pi(?![a-zA-Z])", r"\\pi"), (r"(?<![a-zA-Z\\])sqrt", r"\\sqrt"),
              (r"(?<![a-zA-Z\\])(?:infinity|inf)(?![a-zA-Z])", r"\\infty"),
              (r"(?<![a-zA-Z\\])(sin|cos|tan|cot|sec|csc|ln|log|exp)(?=\()", r"\\\1")]


def normalize(answer):
    """A canonical string for a LaTeX answer: wrappers, spacing, units, degrees, %, $ removed; relations,
    plain-text math and word-joined lists written one way."""
    s = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", answer)
    s = re.sub(r"<\|[^|>]{1,30}\|>", "", s)
    if "\\begin" not in s:  # outside matrices (rows end with \\), \\frac is a doubly escaped \frac
        s = re.sub(r"\\\\(?=[a-zA-Z])", r"\\", s)
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    s = re.sub(r"(?<=\d),\\!\s?(?=\d{3}(?!\d))", "", s)  # thousands: 3,\! 456,\! 789
    s = s.replace("\\!", "")  # negative thin space
    # spacing commands (not the \\ that ends a matrix row)
    s = re.sub(r"(?<!\\)\\(?:displaystyle|limits|,|;|:|quad|qquad|\s)(?![a-zA-Z])|~", " ", s)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\circ|\\degree", "", s)
    s = re.sub(r"\\?%|\\?\$|(?<!\\)\\[()\[\]]", "", s)
    for _ in range(5):  # unwrap \text{..} and friends, innermost first
        s = re.sub(r"\\(?:text|textbf|textit|textnormal|textrm|mathrm|mathbf|mathit|mbox|operatorname)\s*"
                   r"\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"(?<=\d)\s*(?:\^\{?(?:st|nd|rd|th)\}?|(?:st|nd|rd|th)\b)", "", s)  # 9^{th}, 2nd: ordinals
    s = re.sub(r"(?<=\d)\s*(?:percent(?:age)?|pct)\b", "", s)  # 35 percent is 35\%, whose % is dropped above
    s = re.sub(r"\s*\b(?:and|or)\b\s*", ",", s)  # 3 and 5, (2,5) or (5,2): a list
    for pattern, canonical in RELATIONS + BARE_WORDS:
        s = re.sub(pattern, canonical, s)
    s = re.sub(r"\{\s*,\s*\}", ",", s).replace("\\dots", "").replace("\\ldots", "").replace("\\colon", ":")
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    s = re.sub(r"^(?:the answer is|answer:)\s*", "", s, flags=re.I)
    units = RE_UNITS.match(s)
    if units and units.group(1).strip():
        s = units.group(1).strip()
    if not s.startswith(("(", "[")):  # thousands separators (not in tuples / intervals): 10,080 -> 10080
        s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    s = s.replace(" ", "").replace(";", ",").strip(",")
    s = re.sub(r"_\{(\w+)\}", r"_\1", s)  # 1011_{2} is 1011_2
    s = re.sub(r"^[a-zA-Z]\\in(?![a-zA-Z])", "", s)  # x \in [2, 5) is [2, 5)
    s = re.sub(r"\\begin\{array\}\{[^{}]*\}(.*)\\end\{array\}", r"\\begin{pmatrix}\1\\end{pmatrix}", s)
    s = re.sub(r"^[(\[](\\begin\{[pbv]?matrix\}.*\\end\{[pbv]?matrix\})[)\]]$", r"\1", s)  # [\begin{array}..]
    if "\\approx" in s:  # x = 1/3 \approx 0.33: the exact value before the approximation; x \approx 11: 11
        s = s.split("\\approx")[0] if "=" in s.split("\\approx")[0] else s.replace("\\approx", "=")
    mixed = re.fullmatch(r"(-?)(\d+)\\frac\{?(\d)\}?\{?(\d)\}?|(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}", s)
    if mixed:  # 1\frac{4}{5} is one and four fifths
        g = [x for x in mixed.groups() if x is not None]
        s = f"{g[0]}({g[1]}+\\frac{{{g[2]}}}{{{g[3]}}})"
    choice = re.fullmatch(r"\(?([A-Ea-e])\)", s) or re.fullmatch(r"\(([A-Ea-e])\)?", s)
    if choice:  # multiple choice: (C), C), (c
        return choice.group(1).upper()
    while (pair := _outer_pair(s)) and pair[:2] == ("(", ")") and len(_split_top(pair[2], ",")) == 1:
        s = pair[2]  # (x = 5) is x = 5; a tuple or interval keeps its brackets
    while s.startswith("{") and _braced(s, 0) == s[1:-1]:
        s = s[1:-1]  # {1,2,3} is grouping in LaTeX (a set is written \{1,2,3\})
    return s


# -----------------------------------------------------------------------------
# A small LaTeX math parser producing sympy objects (never eval / sympify / parse_expr)


class ParseError(ValueError):
    pass


TOKEN = re.compile(r"\d+\.?\d*|\.\d+|\\[a-zA-Z]+|[a-zA-Z]|[-+*/^()\[\]{}!|_=,&']|\\\\|\\\{|\\\}|\S")
GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta",
         "iota", "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi",
         "chi", "psi", "omega"}
FUNCTIONS = {"sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec,
             "csc": sympy.csc, "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan,
             "ln": sympy.log, "exp": sympy.exp,
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
    power := postfix (^ exponent)? ; postfix := atom !* ;
    atom := number | letter | constant | (expr) | {expr} |
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
        if tok is None:
            return False
        macros = GREEK | set(FUNCTIONS) | set(CONSTANTS) | {"log"}
        return (tok[0].isdigit() or tok[0] == "." or tok.isalpha() or tok in ("(", "{", "\\sqrt", "\\frac")
                or (tok[0] == "\\" and tok[1:] in macros))

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
# Structure: tuples, intervals and inequalities, sets, lists, matrices, equations, ±


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
        return "list", [_label_value(item) or item for item in items]  # x=1, x=2 lists the values 1 and 2
    if s.count("\\pm") == 1:
        return "list", [s.replace("\\pm", "+"), s.replace("\\pm", "-")]
    if "=" in s:
        return "eq", s.split("=")
    return "expr", s


# A label names what an answer is: x, BC, a_1, \theta, g(2), f^{-1}(3), (m,n), |AB|, V_1:V_2.
_NAME = r"(?:\\?[a-zA-Z]+(?:_\{?\w+\}?)?'*)"
_LABEL = (rf"(?:{_NAME}(?:\^\{{-1\}})?(?:\([^()=]*\))?|\({_NAME}(?:,{_NAME})+\)|\|{_NAME}\|)"
          rf"(?::(?:{_NAME}(?:\([^()=]*\))?))*")


def _label_value(s):
    """What follows 'label=' (the value of g(2)=7 is 7; of (m,n)=(4,1), (4,1)); None if s is not of that form.
    A chain a = b = 7 is its last part, the result it arrives at."""
    parts = _split_top(s, "=")
    if len(parts) < 2 or not parts[-1] or len(_split_top(s, ",")) > 1 or not re.fullmatch(_LABEL, parts[0]):
        return None
    return parts[-1]


_SET_MARKS = ("<", ">", "!=", "\\cup", "\\setminus", "\\mathbb{R}", "\\infty", "\\emptyset", "\\varnothing")
_INEQUALITY = {"<": sympy.Lt, "<=": sympy.Le, ">": sympy.Gt, ">=": sympy.Ge}


def real_set(s):
    """The set of real numbers an answer describes, as a sympy set: an interval, a union or difference of
    them, an inequality or a chain of them in one variable, x != a, \\mathbb{R}, \\{a, b\\}. None if it is
    none of these. (a, b) reads as an open interval here: only where the other answer is a set of reals."""
    if s in ("\\mathbb{R}", "(-\\infty,\\infty)"):
        return sympy.S.Reals
    if s in ("\\emptyset", "\\varnothing", "\\{\\}"):
        return sympy.S.EmptySet
    if "\\setminus" in s:
        whole, *removed = (real_set(part) for part in _split_top(s, "\\setminus"))
        return None if whole is None or None in removed else sympy.Complement(whole, *removed)
    if "\\cup" in s:
        parts = [real_set(part) for part in _split_top(s, "\\cup")]
        return None if None in parts else sympy.Union(*parts)
    pair = _outer_pair(s)
    if pair:
        items = _split_top(pair[2], ",")
        if pair[0] == "\\{":
            return sympy.FiniteSet(*map(parse_math, items))
        if len(items) == 2:
            low, high = map(parse_math, items)
            return sympy.Interval(low, high, pair[0] == "(", pair[1] == ")")
        return None
    parts = re.split(r"(<=|>=|!=|<|>)", s)
    if len(parts) == 3:  # lhs op rhs
        return _solve(parse_math(parts[0]) - parse_math(parts[2]), parts[1])
    if len(parts) == 5 and parts[1] in ("<", "<=") and parts[3] in ("<", "<="):  # low < x < high
        low, high = parse_math(parts[0]), parse_math(parts[4])
        try:
            middle = parse_math(parts[2])
        except ParseError:
            middle = None  # 0 < f(x) < 1: a label between two numbers
        if middle is not None and len(middle.free_symbols) == 1:
            return sympy.Intersection(_solve(low - middle, parts[1]), _solve(middle - high, parts[3]))
        if low.is_number and high.is_number:
            return sympy.Interval(low, high, parts[1] == "<", parts[3] == "<")
    return None


def _solve(expression, op):
    """The real solutions of `expression op 0`, in its one variable."""
    (x,) = expression.free_symbols if len(expression.free_symbols) == 1 else (None,)
    if x is None:
        raise ParseError("an inequality in one variable is needed")
    x_real = sympy.Symbol(x.name, real=True)
    expression = expression.xreplace({x: x_real})
    if op == "!=":
        return sympy.Complement(sympy.S.Reals, sympy.solveset(expression, x_real, sympy.S.Reals))
    return sympy.solve_univariate_inequality(_INEQUALITY[op](expression, 0), x_real, relational=False)


def _sets_equal(a, b):
    """Both answers as sets of reals, compared; None when either is not one."""
    try:
        x, y = real_set(a), real_set(b)
    except (ParseError, ZeroDivisionError, TypeError, ValueError, NotImplementedError):
        return None
    if x is None or y is None:
        return None
    empty = sympy.S.EmptySet
    return x == y or (sympy.Complement(x, y) == empty and sympy.Complement(y, x) == empty)


def _half_open(s):
    pair = _outer_pair(s)
    return pair is not None and pair[:2] in (("[", ")"), ("(", "]"))


def scalar_equal(a, b):
    """Are two normalised scalar answers mathematically equal?"""
    if a == b or a.lower() == b.lower():
        return True
    try:
        x, y = parse_math(_ratio(a)), parse_math(_ratio(b))
    except (ParseError, ZeroDivisionError, TypeError, ValueError):
        return False
    return _sympy_equal(x, y) or _rounds_to(a, y, b) or _rounds_to(b, x, a)


def _rounds_to(decimal, value, written):
    """0.0833 for 1/12: a decimal of four or more places is right when the exact value (written without a
    decimal point) rounds to it. Fewer places, as 0.33 for 1/3, stay wrong: MATH asks for exact answers."""
    places = re.fullmatch(r"-?\d*\.(\d{4,})", decimal)
    if not places or "." in written or not value.is_number or value.has(sympy.oo, sympy.zoo, sympy.nan):
        return False
    error = abs(complex(sympy.N(value - sympy.Rational(decimal), 30)))
    return error <= 0.5 * 10.0 ** -len(places.group(1))


def _ratio(s):
    """3:11 is the ratio 3/11."""
    parts = _split_top(s, ":")
    return f"({parts[0]})/({parts[1]})" if len(parts) == 2 and all(parts) else s


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


def _same_set(xs, ys):
    """Equal as sets: every item of each side is on the other; order and repeats do not matter."""
    return all(any(answers_equal(x, y) for y in ys) for x in xs) and \
        all(any(answers_equal(x, y) for x in xs) for y in ys)


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
    """Compare two extracted answers (strings): labels and sets first, then structure, then values."""
    if max(len(pred), len(ref)) > MAX_ANSWER_CHARS:  # no answer is this long: compare as text, in linear time
        return pred.strip() == ref.strip()
    a, b = normalize(pred), normalize(ref)
    if a == b:
        return True
    # the digits alone, where the reference also names the base the problem asked for: 31 for 31_6
    based = re.fullmatch(r"(\w+)_(\d+)", b)
    if based and a.lower() == based.group(1).lower():
        return True
    # a label's value: (m,n)=(4,1) is (4,1) and g(2)=7 is 7, unless both sides are equations to compare
    label_a, label_b = _label_value(a), _label_value(b)
    if label_a is not None and ("=" not in b or label_b is not None):
        a = label_a
    if label_b is not None and ("=" not in a or label_a is not None):
        b = label_b
    if a == b:
        return True
    if any(mark in s for s in (a, b) for mark in _SET_MARKS) or _half_open(a) or _half_open(b):
        same = _sets_equal(a, b)  # inequalities, intervals, unions: equal as sets of reals
        if same is not None:
            return same
    (ka, pa), (kb, pb) = structure(a), structure(b)
    if ka == "matrix" and kb == "seq" and all(len(r) == 1 for r in pa):  # column vector written as a tuple
        ka, pa = "seq", (pb[0], [r[0] for r in pa])
    if kb == "matrix" and ka == "seq" and all(len(r) == 1 for r in pb):
        kb, pb = "seq", (pa[0], [r[0] for r in pb])
    if ka == "list" and kb == "expr":  # one answer boxed twice, as 15\\frac{39}{40} and as \\frac{639}{40}
        return all(answers_equal(item, b) for item in pa)
    if ka == "list" and kb == "seq":  # an ordered pair written without its parentheses: still in order
        return len(pa) == len(pb[1]) and all(map(answers_equal, pa, pb[1]))
    if ka != kb:  # a bare list of solutions may come back as a set or in parentheses: order is not asked for
        def items(kind, payload):
            return payload[1] if kind == "seq" else payload
        unordered = {"list", "set", "seq"}
        return ka in unordered and kb in unordered and "list" in (ka, kb) and _same_set(items(ka, pa),
                                                                                         items(kb, pb))
    if ka == "expr":
        return scalar_equal(pa, pb)
    if ka == "seq":
        return pa[0] == pb[0] and len(pa[1]) == len(pb[1]) and all(map(scalar_equal, pa[1], pb[1]))
    if ka in ("list", "set"):
        return _same_set(pa, pb)
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
    """Raise TimeoutError in this thread after `seconds`, whichever thread it is (a SIGALRM timer works in the
    main thread only). A timer thread asks the interpreter to raise it between two bytecodes, as a signal
    handler would: that stops Python code (sympy's), not one long C call, so the checker keeps those short by
    construction (linear extraction, bounded lengths, nesting, number sizes)."""
    thread, lock, state = threading.get_ident(), threading.Lock(), {"inside": True, "raised": False}

    def expire():
        with lock:
            if state["inside"]:
                state["raised"] = _async_raise(thread, ctypes.py_object(TimeoutError)) == 1
    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:  # expire() does nothing from here on, and a TimeoutError still on its way is withdrawn
            state["inside"] = False
            if state["raised"]:
                _async_raise(thread, None)
        timer.cancel()


def _async_raise(thread, exception):
    """Make `thread` raise `exception` at its next bytecode (None withdraws one not yet raised)."""
    return ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), exception)


def grade_output(model_output, reference, extract=extract_answer):
    """(extracted answer, correct) for a model's full output: extraction and comparison within one time limit,
    in any thread. Never raises, never runs model text."""
    extracted = None
    try:
        with time_limit(TIME_LIMIT_S):
            extracted = extract(model_output)
            correct = isinstance(extracted, str) and isinstance(reference, str) and \
                answers_equal(extracted, reference)
        return extracted, bool(correct)
    except (Exception, TimeoutError):  # pathological input (too big, too deep, too slow) is simply wrong
        return extracted, False


def grade(extracted, reference):
    """True when an answer already extracted equals the reference."""
    return grade_output(extracted, reference, extract=lambda answer: answer)[1]


def is_correct(model_output, reference):
    """Grade a model's full output against a reference answer."""
    return grade_output(model_output, reference)[1]


# =============================================================================
# Part 2: answering problems, with a local model (evaluation, or a local teacher) or through a server (a
# teacher behind an OpenAI-compatible API). The steps, as in the reference chapter: 1. the model and its
# tokenizer, 2. each problem's prompt, 3. the answers, 4. each one graded as it completes and written at once,
# 5. the summary: accuracy with error bars, by subject and level, and what went wrong.

CHECKER_VERSION = 4  # raised whenever grading changes; part of every summary's protocol
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
    message_content), graded on its final answer (what follows the thinking)."""
    thinking, content = data.split_thinking(answer.text)
    extracted, correct = grade_output(content, str(row.get("answer")))
    ids = answer.ids if answer.ids is not None else tok.encode(answer.text, chat_wrapped=False)
    return {"index": index, "sample": sample, "unique_id": row.get("unique_id"),
            "subject": row.get("subject"), "level": row.get("level"), "problem": row["problem"],
            "gtruth_answer": row.get("answer"), "message_thinking": thinking, "message_content": content,
            "generated_text": answer.text, "extracted": extracted, "correct": correct,
            "num_tokens": answer.num_tokens, "thinking_tokens": len(tok.encode(thinking, chat_wrapped=False)),
            "content_tokens": len(tok.encode(content, chat_wrapped=False)),
            "finish_reason": answer.finish_reason, "truncated": answer.finish_reason == "length",
            "looped": ends_in_loop(ids), "boxed": has_box(content), "thought_cut": answer.thought_cut,
            "seconds": round(answer.seconds, 3), **(answer.usage or {})}


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
    return {"model": model, "tokenizer": tok.kind, "prompt": "reference" if args.prompt_template is None
            else args.prompt_template, "data": str(args.data_path or "math500"),
            "dataset_size": args.dataset_size, "max_new_tokens": args.max_new_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
            "seed": sampling.seed, "num_samples": args.num_samples, "thinking_budget": args.thinking_budget,
            "answer_budget": args.answer_budget if args.thinking_budget else None,
            "dtype": "server" if args.api_base else str(dtype).replace("torch.", ""),
            "checker": CHECKER_VERSION}


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
    ((i, s), error) for a request that failed every try or one that stops the run (data.ServerError)."""
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
            except (data.ServerError, data.GaveUp) as error:
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
        if isinstance(answer, data.ServerError):
            raise answer
        if isinstance(answer, data.GaveUp):
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
    rank, world_size, device = qwen3.init_processes(args.device, group=False)  # no collectives: files only
    out = Path(args.out)
    rows = data.load_problems(args.data_path, args.cache_dir)[:args.dataset_size]
    template = read_template(args.prompt_template)
    check_generation_args(args, out, world_size)
    # 1. the model and its tokenizer; or a server, and the student's tokenizer to measure its answers with
    dtype = qwen3.pick_dtype(args.dtype, device)
    if args.api_base:
        server = data.ChatServer(args.api_base, args.api_model, args.api_key_env, args.timeout, args.tries)
        tok = qwen3.load_tokenizer(args.model, args.which_model, args.cache_dir)
    else:
        model, tok = qwen3.load(args.checkpoint_path or args.model, args.which_model, device, dtype,
                                args.cache_dir)
    sampling, budget = sampling_settings(args), thinking_budget(args, tok)
    settings = protocol(args, tok, dtype, sampling)
    summary_path = summary_path_of(out)
    if args.resume and summary_path.exists():
        old = json.loads(summary_path.read_text()).get("protocol", {})
        changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if changed:
            raise ValueError(f"--resume: {out} was made with other settings, (then, now): {changed}; "
                             "choose another --out")
    # 2. the prompts; each process takes every world_size-th problem in order of prompt length (balanced work)
    by_length = sorted(range(len(rows)), key=lambda i: len(rows[i]["problem"]))
    mine = set(by_length[rank::world_size])
    part = out if world_size == 1 else out.with_name(f"{out.stem}.part{rank}-of-{world_size}{out.suffix}")
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
        print(f"{where}, model {settings['model']}, tokenizer {tok.kind}: {describe_protocol(settings)}; "
              f"{len(rows)} problems, {len(todo)} answers to make")
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
    records = previous + new
    if world_size > 1:  # wait for the other processes' parts (torchrun stops everyone if one fails)
        parts = [out.with_name(f"{out.stem}.part{r}-of-{world_size}{out.suffix}") for r in range(world_size)]
        while not all(p.with_suffix(".done").exists() for p in parts[1:]):
            time.sleep(1)
        records = previous + [r for p in parts for r in read_records(p)]
    # one record per (problem, sample), in order: the same file whatever the batch size or number of processes
    records = sorted({(r["index"], r.get("sample", 0)): r for r in records}.values(),
                     key=lambda r: (r["index"], r.get("sample", 0)))
    write_records(out, records)
    if world_size > 1:
        for p in parts:
            p.with_suffix(".done").unlink(missing_ok=True)
            if p != out:
                p.unlink()
    if args.teacher_json:  # the reference's teacher-file format, to share
        teacher = [{k: r[k] for k in ("problem", "gtruth_answer", "message_thinking", "message_content")}
                   for r in records]
        Path(args.teacher_json).write_text(json.dumps(teacher, indent=1, ensure_ascii=False),
                                           encoding="utf-8")
        print(f"wrote {len(teacher)} teacher rows to {args.teacher_json}")
    # 5. the summary
    summary = finish(args, records, wall, settings, out, complete=not gave_up)
    if gave_up:
        print(f"{len(gave_up)} answers failed every try ({gave_up[-1]}): run the same command with --resume "
              "to ask for them again", file=sys.stderr)
    return summary


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
        extracted, correct = grade_output(text, str(ref))
        records.append({"index": i, "sample": 0, "subject": row.get("subject"), "level": row.get("level"),
                        "gtruth_answer": ref, "generated_text": text, "extracted": extracted,
                        "correct": correct, "boxed": isinstance(text, str) and has_box(text)})
    out = Path(args.out)
    write_records(out, records)
    return finish(args, records, None, {"data": args.json_path, "checker": CHECKER_VERSION}, out)


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
    """Atomic: a temp file, then a rename (a kill while writing leaves the old file whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)


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
            if group[0]["extracted"] == r["extracted"] or grade(r["extracted"], group[0]["extracted"]):
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
    summary["lengths"] = {f: length_stats([r[f] for r in records]) for f in fields}
    if records and "completion_tokens" in records[0]:  # the server's counts: what it bills
        usage = {k: sum(r[k] for r in records) for k in ("prompt_tokens", "completion_tokens")}
        if price_in is not None and price_out is not None:
            usage["cost_usd"] = (usage["prompt_tokens"] * price_in
                                 + usage["completion_tokens"] * price_out) / 1e6
            usage["cost_usd_per_1000_answers"] = 1000 * usage["cost_usd"] / len(records)
        summary["usage"] = usage
    return {**summary, "protocol": settings or {}, "complete": True}


def length_stats(lengths):
    ordered = sorted(lengths)
    return {"average": sum(ordered) / len(ordered), "median": ordered[len(ordered) // 2], "min": ordered[0],
            "max": ordered[-1]}


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
        print(f"  average answer {s['avg_response_tokens']:.0f} tokens; "
              f"{100 * s['truncated_share']:.1f}% hit the cap, {100 * s['looped_share']:.1f}% end in a loop, "
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
    p, sub = qwen3.parser(__doc__, default="generate",
                          generate="answer MATH-500 (or a file in its schema) and grade the answers",
                          grade="grade answers already in a file (no model)")
    g = sub["generate"]
    qwen3.add_flags(g, "--model", "--which_model", "--checkpoint_path")
    a = g.add_argument
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
    qwen3.add_flags(g, "--device", "--dtype", "--cache_dir")
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
    return p.parse_args(qwen3.with_command(argv, sub, lambda argv: "generate"))


def main(argv=None):
    args = parse_args(argv)
    args.argv = qwen3.with_command(argv, ("generate", "grade"), lambda argv: "generate")  # to print on Ctrl-C
    return grade_file(args) if args.cmd == "grade" else run_generation(args)


if __name__ == "__main__":
    qwen3.run(main)
