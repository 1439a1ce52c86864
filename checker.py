"""
The answer checker: is a model's final \\boxed{} answer mathematically equal to the reference?

extract_answer finds the final answer in a model's text, normalize writes it canonically, Parser reads it as
math, answers_equal compares two answers; grade_output wraps that in a time limit. Where an answer is
ambiguous, the comments say which reading a human grader of MATH would choose, and why.

It never evaluates model text as code: answers are parsed by a small recursive-descent parser into sympy
objects, with limits on length, nesting, number sizes and powers, and one time limit per answer.

    checker.is_correct(r"so the answer is $\\boxed{\\frac{1}{2}}$", "0.5")   # True
"""
import ctypes
import itertools
import math
import re
import threading
from contextlib import contextmanager

import sympy

VERSION = 4  # raised whenever grading changes; part of every evaluation summary's protocol

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
