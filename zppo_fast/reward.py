r"""The verifier: a binary reward from the last ``\boxed{...}`` answer of a response.

Public API
----------
``grade(response, gold) -> float``
    1.0 when the content of the response's last ``\boxed{...}`` is equivalent to ``gold``,
    else 0.0. Never raises on model output: a non-string, box-less, malformed or
    pathological response scores 0.0.
``extract_boxed(text) -> str | None``
    The stripped content of the LAST ``\boxed{...}`` (nested braces handled), ``None`` when
    there is none or the last one is unbalanced.
``final_answer(text) -> str``
    The response's answer as the NCQ prompt lists it: the last box, normalized, or
    ``NO_ANSWER`` when there is no (non-empty) box.
``normalize_answer(answer, *, strip_units=False) -> str``
    The one normalizer every function above uses.
``NO_ANSWER``
    The marker for "this rollout has no boxed answer".

The rules (after the paper's grader, ``mathruler.grader``, itself the PRM800K grader)
------------------------------------------------------------------------------------
Extraction. The last ``\boxed{`` in the text decides (``\boxed {`` with spaces is accepted, as
TeX accepts it). Braces are counted TeX-style: ``\{`` and ``\}`` are characters, not groups.
If that last box never closes, the answer is missing: we do not fall back to an earlier box,
because the model's final word is malformed. ``\boxed 5`` (a brace-less single token) is NOT
accepted, like mathruler; the closing instruction asks for ``\boxed{}``. ``<think>`` is not
special: a box after the reasoning is simply later than the boxes inside it.

Normalization (both sides, identically): unwrap ``\text{..}``/``\mathrm{..}``/``\boxed{..}``
and similar wrappers; ``\dfrac``/``\tfrac`` -> ``\frac``; ``\frac12`` -> ``\frac{1}{2}``; drop
``\left``/``\right``, TeX spacing (``\,`` ``\!`` ``\quad`` ...), ``$`` and ``\$``; read the
Unicode minus as ``-``; lowercase (text answers are case-insensitive, as in mathruler); drop
all whitespace and trailing periods; strip matching outer braces; drop a short variable
assignment (``x = 5`` -> ``5``, mathd's rule); remove thousands separators (``1,000`` and
``1{,}000``) when the whole answer is such a number. If what is left is a number it is rewritten canonically (``007`` -> ``7``,
``.50`` -> ``0.5``, ``\frac{-3}{4}`` -> ``-3/4``).

Equivalence, first with units kept and then, as a second pass, with degree and percent marks
stripped (``^\circ``, ``^{\circ}``, ``\circ``, ``\degree``, ``°``, ``\%``, ``%``, a trailing
"degrees"/"percent"):

1. Equal normalized strings are equivalent; an empty answer never is.
2. Two numbers are compared exactly, with integer arithmetic (never floats):
   integers and decimals by canonical digit strings (so 10,000-digit answers compare without
   Python's int-conversion limit); a quotient with a decimal part (``1.5/3``) by value.
   Two paper rules on unreduced fractions are kept: two fractions ``a/b`` must be written
   alike (``2/4`` is not ``1/2``), and an integer never equals a fraction (``4/2`` is not
   ``2``, nor is ``4.0/2``). A decimal equals a fraction of the same value (``0.5`` is
   ``1/2``; ``2.0`` is ``2``).
3. An integer answer on either side must match by rule 2 or not at all (mathruler: "if the
   ground truth answer is an integer, we require the given answer to be a strict match").
4. Tuples/intervals ``(a, b)``, ``[a, b)`` with the same brackets and element count are
   compared element by element with these rules.
5. Otherwise, if sympy is installed, simple LaTeX (``\frac``, ``\sqrt``, ``\pi``, ``^``,
   ``\cdot``, one-letter variables) is converted to a whitelisted sympy string and the
   difference simplified, in a separate worker process killed after ``SYMBOLIC_TIMEOUT_S``
   seconds (a timeout counts as "not equivalent"). Stricter than mathruler where its
   leniency is wrong: adjacent letters (``ab`` vs ``ba``, i.e. words) are never symbolic,
   and neither is a digit followed by ``\frac`` (``7\frac{3}{4}`` is ambiguous).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import re
import select
import subprocess
import sys
import threading
from fractions import Fraction
from functools import lru_cache
from typing import NamedTuple

__all__ = [
    "NO_ANSWER",
    "SYMBOLIC_TIMEOUT_S",
    "extract_boxed",
    "final_answer",
    "grade",
    "normalize_answer",
]

NO_ANSWER = "[no answer]"
"""What NCQ lists (and leaves out) for a rollout without a boxed answer."""

SYMBOLIC_TIMEOUT_S = 2.0
"""Wall-clock limit of one sympy comparison; 0 or None turns the symbolic step off."""

# Numbers longer than this (digits per part) are compared only by their canonical strings:
# converting them is quadratic, and no honest answer is this long.
_MAX_NUMBER_DIGITS = 100_000
# Python refuses int(str) above 4300 digits (sys.int_info.default_max_str_digits); convert in
# chunks below that limit instead of changing the process-wide setting.
_INT_CHUNK = 4000
# Symbolic inputs longer than this are not worth sympy's time (and bound our recursion).
_SYMBOLIC_MAX_CHARS = 160


# --- Extraction ----------------------------------------------------------------------------

# Braces counted TeX-style: `\{`, `\}` (and any other escaped char) are skipped as a pair.
_BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.DOTALL)
_BOXED_OPEN_RE = re.compile(r"\\boxed\s*\{")


def extract_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` in ``text``, stripped; None if none or unbalanced.

    Linear in the length of the text and iterative, so 100,000 nested braces are fine.
    """
    if not isinstance(text, str):
        return None
    end = len(text)
    while True:  # walk back over `\boxed` occurrences until one is followed by `{`
        start = text.rfind("\\boxed", 0, end)
        if start < 0:
            return None
        m = _BOXED_OPEN_RE.match(text, start)
        if m:
            break
        end = start
    depth = 0
    for tok in _BRACE_TOKEN_RE.finditer(text, m.end() - 1):
        t = tok.group()
        if t == "{":
            depth += 1
        elif t == "}":
            depth -= 1
            if depth == 0:
                return text[m.end() : tok.start()].strip()
    return None  # the last box never closes


def final_answer(text: str) -> str:
    """The last boxed answer, normalized (for display and dedup in NCQ), or ``NO_ANSWER``.

    An empty box counts as no answer: ``\\boxed{}`` tells the student nothing.
    """
    try:
        box = extract_boxed(text)
        answer = normalize_answer(box) if box is not None else ""
    except Exception:  # never let a malformed rollout break prompt building
        answer = ""
    return answer or NO_ANSWER


# --- Normalization -------------------------------------------------------------------------

# Commands whose braced argument is kept and whose name is dropped.
_WRAPPERS = frozenset(
    ["text", "textbf", "textit", "textrm", "textsf", "texttt", "textnormal", "mathrm", "mathbf", "mathit", "mathsf", "mathtt", "mathnormal", "mbox", "hbox", "operatorname", "boxed"]
)
_WRAPPER_PRESENT_RE = re.compile(r"\\(?:" + "|".join(sorted(_WRAPPERS)) + r")(?![A-Za-z])")
_UNWRAP_TOKEN_RE = re.compile(r"\\([A-Za-z]+)(\s*\{)?|\\.|[{}]|[^\\{}]+", re.DOTALL)
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right|[bB]igg?[lr]?)(?![A-Za-z])")
_SPACING_RE = re.compile(r"\\[,;:! ]|\\q?quad(?![A-Za-z])|\\(?:display|text)style(?![A-Za-z])|~")
_FRAC_SHORT_RE = re.compile(r"\\frac(\d)(\d)", re.ASCII)
_UNITS_RE = re.compile(
    r"\^\{\\circ\}|\^\\circ|\\circ|\\degrees?|°|\\%|%|(?:degrees?|percent)$"
)
_ASSIGN_LHS_RE = re.compile(r"[a-z]{1,2}")
_TEX_THOUSANDS_RE = re.compile(r"(?<=\d)\{,\}(?=\d)", re.ASCII)
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?", re.ASCII)


def _unwrap(s: str) -> str:
    r"""Drop wrapper commands (``\text{a}`` -> ``a``) in one linear, non-recursive pass."""
    out: list[str] = []
    stack: list[bool] = []  # per open group: True when its closing brace must be dropped
    for m in _UNWRAP_TOKEN_RE.finditer(s):
        t = m.group()
        name = m.group(1)
        if name is not None:
            if name in _WRAPPERS:
                if m.group(2):
                    stack.append(True)
                # a wrapper without a group is just dropped
            else:
                out.append(t)
                if m.group(2):
                    stack.append(False)
        elif t == "{":
            stack.append(False)
            out.append(t)
        elif t == "}":
            if not stack or not stack.pop():
                out.append(t)  # an ordinary (or unbalanced) closing brace stays
        else:
            out.append(t)
    return "".join(out)


def _brace_pairs(s: str) -> dict[int, int]:
    """Map each group-opening brace to its closing brace (TeX-style, iterative)."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    for tok in _BRACE_TOKEN_RE.finditer(s):
        t = tok.group()
        if t == "{":
            stack.append(tok.start())
        elif t == "}" and stack:
            pairs[stack.pop()] = tok.start()
    return pairs


def _strip_outer_braces(s: str) -> str:
    """``{{5}}`` -> ``5``, but ``{1}{2}`` stays; linear even for 100,000 nested layers."""
    if not (s.startswith("{") and s.endswith("}")):
        return s
    pairs = _brace_pairs(s)
    i, j = 0, len(s) - 1
    while i < j and pairs.get(i) == j:
        i, j = i + 1, j - 1
    return s[i : j + 1]


def _clean(s: str, strip_units: bool) -> str:
    """The textual part of the normalizer (see the module docstring for the rule list)."""
    if _WRAPPER_PRESENT_RE.search(s):
        s = _unwrap(s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _LEFT_RIGHT_RE.sub("", s)
    s = _SPACING_RE.sub("", s)
    s = s.replace("\\$", "").replace("$", "").replace("\u2212", "-")  # U+2212: Unicode minus
    s = "".join(s.lower().split())
    if strip_units:
        s = _UNITS_RE.sub("", s)
    s = _FRAC_SHORT_RE.sub(r"\\frac{\1}{\2}", s)
    s = _strip_outer_braces(s.rstrip("."))
    if s.count("=") == 1:  # "x=5" -> "5" (mathd: a left-hand side of at most 2 characters)
        lhs, rhs = s.split("=")
        if _ASSIGN_LHS_RE.fullmatch(lhs):
            s = _strip_outer_braces(rhs)
    s = _TEX_THOUSANDS_RE.sub(",", s)
    if "," in s and _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    return s


def normalize_answer(answer: str, *, strip_units: bool = False) -> str:
    r"""Canonical form of one answer: cleaned text, or a number in canonical notation.

    ``strip_units=True`` is the grader's second pass: degree and percent marks removed.
    """
    if not isinstance(answer, str):
        return ""
    s = _clean(answer, strip_units)
    num = _parse_number(s)
    return num.canon if num is not None else s


# --- Numbers -------------------------------------------------------------------------------


class _Number(NamedTuple):
    """An exact number as digit strings: value = sign * (a / b) / (c / d).

    kind: "int" (integer-valued decimal), "dec" (other decimal), "frac" (a/b with integer
    parts, kept as written), "quot" (a/b with a decimal part, compared by value).
    """

    kind: str
    canon: str
    sign: int
    a: str
    b: str
    c: str
    d: str


_DEC_RE = re.compile(r"([+-]?)(\d*)(?:\.(\d*))?", re.ASCII)  # ASCII: int("٣") would parse
_FRAC_RE = re.compile(r"([+-]?)\\frac\{([^{}]*)\}\{([^{}]*)\}")


def _parse_decimal(s: str) -> tuple[int, str, str, bool] | None:
    """``"-007.50"`` -> (-1, "7", "5", True): sign, integer digits, fraction digits, had dot."""
    m = _DEC_RE.fullmatch(s)
    if not m or not (m.group(2) or m.group(3)):
        return None
    sign = -1 if m.group(1) == "-" else 1
    return sign, m.group(2).lstrip("0") or "0", (m.group(3) or "").rstrip("0"), "." in s


def _parse_number(s: str) -> _Number | None:
    """Parse a whole cleaned answer as a number; None when it is anything else."""
    m = _FRAC_RE.fullmatch(s)
    if m:  # \frac{A}{B} with numeric A, B; a sign may sit outside or inside
        s = f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    if s.count("/") == 1:
        top, bottom = s.split("/")
        p, q = _parse_decimal(top), _parse_decimal(bottom)
        if p is None or q is None or (q[1] == "0" and not q[2]):
            return None  # not numeric, or a zero denominator
        sign = p[0] * q[0] if p[1] != "0" or p[2] else 1
        if not (p[3] or q[3]):  # a/b with integer parts: kept as written
            canon = ("-" if sign < 0 else "") + p[1] + "/" + q[1]
            return _Number("frac", canon, sign, p[1], "1", q[1], "1")
        pa, pb = _decimal_ratio(p)
        qa, qb = _decimal_ratio(q)
        canon = ("-" if sign < 0 else "") + _decimal_canon(p) + "/" + _decimal_canon(q)
        return _Number("quot", canon, sign, pa, pb, qa, qb)
    p = _parse_decimal(s)
    if p is None:
        return None
    sign = p[0] if p[1] != "0" or p[2] else 1
    a, b = _decimal_ratio(p)
    canon = ("-" if sign < 0 else "") + _decimal_canon(p)
    return _Number("dec" if p[2] else "int", canon, sign, a, b, "1", "1")


def _decimal_canon(p: tuple[int, str, str, bool]) -> str:
    return p[1] + ("." + p[2] if p[2] else "")


def _decimal_ratio(p: tuple[int, str, str, bool]) -> tuple[str, str]:
    """Unsigned decimal as numerator/denominator digit strings: 7.5 -> ("75", "10")."""
    return (p[1] + p[2]).lstrip("0") or "0", "1" + "0" * len(p[2])


def _to_int(digits: str) -> int:
    """int(digits) without Python's 4300-digit conversion limit (chunked, capped)."""
    if len(digits) > _MAX_NUMBER_DIGITS:
        raise OverflowError("number too long to convert")
    if len(digits) <= _INT_CHUNK:
        return int(digits)
    n = 0
    for i in range(0, len(digits), _INT_CHUNK):
        part = digits[i : i + _INT_CHUNK]
        n = n * 10 ** len(part) + int(part)
    return n


def _numbers_equal(x: _Number, y: _Number) -> bool:
    """Exact comparison with the paper's two rules on unreduced fractions."""
    kinds = {x.kind, y.kind}
    if "int" in kinds and kinds & {"frac", "quot"}:
        return False  # "4/2" is not the integer 2 (mathruler's strict-integer rule)
    if x.kind == y.kind == "frac" or kinds <= {"int", "dec"}:
        return x.canon == y.canon  # written-alike fractions; decimals by canonical digits
    if x.sign != y.sign:
        return False
    try:  # sign equal: compare a_x d_x c_y b_y ... by cross-multiplication
        left = _to_int(x.a) * _to_int(x.d) * _to_int(y.b) * _to_int(y.c)
        right = _to_int(y.a) * _to_int(y.d) * _to_int(x.b) * _to_int(x.c)
    except OverflowError:
        return x.canon == y.canon
    return left == right


# --- Equivalence ---------------------------------------------------------------------------

_TUPLE_OPEN, _TUPLE_CLOSE = "([", ")]"
_MAX_TUPLE_ELEMENTS = 64


def _split_tuple(s: str) -> list[str] | None:
    """``(1,2]`` -> ["1", "2"]; None unless s is a flat bracketed list of 2+ elements."""
    if len(s) < 5 or s[0] not in _TUPLE_OPEN or s[-1] not in _TUPLE_CLOSE:
        return None
    inner = s[1:-1]
    if any(ch in inner for ch in "()[]"):
        return None  # nested brackets: compare as strings only (as mathruler does)
    elems = inner.split(",")
    if not 2 <= len(elems) <= _MAX_TUPLE_ELEMENTS:
        return None
    return elems


def _equivalent(a: str, b: str, *, timeout_s: float | None, in_tuple: bool = False) -> bool:
    """Rules 1-5 of the module docstring on two cleaned answers."""
    if not a or not b:
        return False
    if a == b:
        return True
    x, y = _parse_number(a), _parse_number(b)
    if x is not None and y is not None:
        return _numbers_equal(x, y)
    if (x is not None and x.kind == "int") or (y is not None and y.kind == "int"):
        return False  # an integer on one side and a non-number on the other
    if not in_tuple:
        ea, eb = _split_tuple(a), _split_tuple(b)
        if ea is not None or eb is not None:
            if ea is None or eb is None or len(ea) != len(eb):
                return False
            if a[0] != b[0] or a[-1] != b[-1]:
                return False  # (0,1) is not [0,1]
            return all(
                _equivalent(p, q, timeout_s=timeout_s, in_tuple=True) for p, q in zip(ea, eb)
            )
    return _symbolic_equal(a, b, timeout_s)


def grade(response: str, gold: str) -> float:
    r"""1.0 if the last ``\boxed{...}`` of ``response`` is equivalent to ``gold``, else 0.0.

    ``gold`` may be a string or an int/float/Fraction (stringified); any other gold type is
    a data bug and raises TypeError. Anything wrong with ``response`` scores 0.0.
    """
    if not isinstance(gold, str):
        if isinstance(gold, bool) or not isinstance(gold, (int, float, Fraction)):
            raise TypeError(f"gold answer must be a string, got {type(gold).__name__}")
        gold = str(gold)
    try:
        box = extract_boxed(response)
        if box is None:
            return 0.0
        timeout_s = SYMBOLIC_TIMEOUT_S
        first = (_clean(box, False), _clean(gold, False))
        if _equivalent(*first, timeout_s=timeout_s):
            return 1.0
        second = (_clean(box, True), _clean(gold, True))  # degree/percent marks stripped
        if second != first and _equivalent(*second, timeout_s=timeout_s):
            return 1.0
        return 0.0
    except Exception:  # the reward must never take the trainer down on model output
        return 0.0


# --- Symbolic step (optional sympy, in a killable worker process) --------------------------

_SYM_TOKEN_RE = re.compile(
    # No "(?![a-z])" after the names: whitespace is gone by now, so "\pi r" arrives as "\pir".
    r"\\(?:frac|sqrt|pi|cdot(?!s)|times)|\d+(?:\.\d+)?|[a-z]|[-+*/^(){}\[\]]", re.ASCII
)
_SYM_CLOSERS = {"(": ")", "{": "}"}


class _Reject(Exception):
    """The expression is outside the whitelisted LaTeX subset."""


def _sym_atom(toks: list[str], i: int) -> tuple[str, int]:
    """One operand: number, letter, \\pi, group, \\frac{..}{..}, \\sqrt[..]{..}."""
    if i >= len(toks):
        raise _Reject
    t = toks[i]
    if t[0].isdigit():
        if "." in t:  # decimals as exact integer ratios, never floats
            ip, fp = t.split(".")
            return f"({ip}{fp}/1{'0' * len(fp)})", i + 1
        return t, i + 1
    if len(t) == 1 and t.isalpha():
        return t, i + 1
    if t == "\\pi":
        return "pi", i + 1
    if t in _SYM_CLOSERS:
        inner, i = _sym_seq(toks, i + 1, _SYM_CLOSERS[t])
        return f"({inner})", i
    if t == "\\frac":
        num, i = _sym_atom(toks, i + 1)
        den, i = _sym_atom(toks, i)
        return f"(({num})/({den}))", i
    if t == "\\sqrt":
        if i + 1 < len(toks) and toks[i + 1] == "[":
            n, i = _sym_seq(toks, i + 2, "]")
            arg, i = _sym_atom(toks, i)
            return f"(({arg})**(1/({n})))", i
        arg, i = _sym_atom(toks, i + 1)
        return f"sqrt({arg})", i
    raise _Reject


def _sym_seq(toks: list[str], i: int, closer: str | None) -> tuple[str, int]:
    """A juxtaposition/operator sequence up to ``closer``; implicit products made explicit."""
    parts: list[str] = []
    prev_operand = prev_letter = False
    while i < len(toks):
        t = toks[i]
        if t == closer:
            return "".join(parts), i + 1
        if t in ")}]":
            raise _Reject
        if t in ("+", "-", "*", "/", "\\cdot", "\\times"):
            parts.append(t if len(t) == 1 else "*")
            prev_operand = prev_letter = False
            i += 1
            continue
        if t == "^":
            exp, i = _sym_atom(toks, i + 1)
            # sympy can hang on towers and huge powers (mathruler's BAD_REGEXES, in spirit)
            if "**" in exp or re.search(r"\d{3,}", exp):
                raise _Reject
            parts.append("**" + exp)
            prev_operand, prev_letter = True, False
            continue
        is_letter = len(t) == 1 and t.isalpha()
        if prev_operand:
            if is_letter and prev_letter:
                raise _Reject  # adjacent letters are a word ("ab" vs "ba"), not a product
            if t == "\\frac" and parts[-1][-1:].isdigit():
                raise _Reject  # 7\frac{3}{4}: mixed number or product? don't guess
            parts.append("*")
        atom, i = _sym_atom(toks, i)
        parts.append(atom)
        prev_operand, prev_letter = True, is_letter
    if closer is not None:
        raise _Reject
    return "".join(parts), i


def _to_sympy(s: str) -> str | None:
    """Whitelisted sympy source for a cleaned answer, or None outside the supported subset.

    The output holds only digits, one-letter names, ``pi``, ``sqrt``, operators and
    parentheses, so evaluating it in the worker cannot do anything but arithmetic.
    """
    if len(s) > _SYMBOLIC_MAX_CHARS:
        return None
    toks, pos = [], 0
    for m in _SYM_TOKEN_RE.finditer(s):
        if m.start() != pos:
            return None  # a character outside the whitelist
        toks.append(m.group())
        pos = m.end()
    if pos != len(s) or not toks:
        return None
    try:
        expr, _ = _sym_seq(toks, 0, None)
    except (_Reject, RecursionError):
        return None
    letters = set(re.findall(r"(?<![a-z])[a-z](?![a-z])", expr))
    return expr if len(letters) <= 2 else None  # mathruler: at most two unknowns


_WORKER_SRC = r"""
import json, re, sys
import sympy
from sympy.parsing.sympy_parser import parse_expr, standard_transformations
sys.stdout.write("ready\n"); sys.stdout.flush()
for line in sys.stdin:
    try:
        a, b = json.loads(line)
        src = "(" + a + ")-(" + b + ")"
        names = {c: sympy.Symbol(c) for c in re.findall(r"(?<![a-z])[a-z](?![a-z])", src)}
        names.update(pi=sympy.pi, sqrt=sympy.sqrt)
        diff = parse_expr(src, local_dict=names, transformations=standard_transformations)
        out = "1" if sympy.simplify(diff) == 0 else "0"
    except Exception:
        out = "0"
    sys.stdout.write(out + "\n"); sys.stdout.flush()
"""


class _SympyWorker:
    """One long-lived ``python -c`` process running sympy; killed and restarted on timeout.

    A process, not a thread or SIGALRM: only a process can be stopped inside a C-level
    big-integer operation, and it works from any thread of the trainer.
    """

    _START_TIMEOUT_S = 60.0

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._disabled = importlib.util.find_spec("sympy") is None or os.name != "posix"

    def _start(self) -> subprocess.Popen | None:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_SRC],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        except OSError:
            self._disabled = True
            return None
        if self._read_line(proc, self._START_TIMEOUT_S) != "ready":
            self._kill(proc)
            self._disabled = True  # sympy cannot start here: stop trying
            return None
        return proc

    @staticmethod
    def _read_line(proc: subprocess.Popen, timeout_s: float) -> str | None:
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        if not ready:
            return None
        line = proc.stdout.readline()
        return line.strip() if line else None

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        try:
            proc.kill()
            proc.wait(timeout=5)
        except Exception:
            pass

    def equal(self, a: str, b: str, timeout_s: float) -> bool:
        """Does sympy simplify ``(a) - (b)`` to 0 within ``timeout_s`` seconds?"""
        with self._lock:
            if self._disabled:
                return False
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
                if self._proc is None:
                    return False
            proc = self._proc
            try:
                proc.stdin.write(json.dumps([a, b]) + "\n")
                proc.stdin.flush()
                answer = self._read_line(proc, timeout_s)
            except (OSError, ValueError):
                answer = None
            if answer is None:  # timed out or died: discard it, the next call restarts
                self._kill(proc)
                self._proc = None
                return False
            return answer == "1"

    def _after_fork(self) -> None:
        # A forked child (e.g. a data-loader worker) must not share the parent's pipes or a
        # lock some other thread held at fork time: start afresh, leave the parent's worker.
        self._lock = threading.Lock()
        self._proc = None

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                self._kill(self._proc)
                self._proc = None


_WORKER = _SympyWorker()
atexit.register(_WORKER.close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_WORKER._after_fork)


@lru_cache(maxsize=8192)
def _symbolic_cached(a: str, b: str, timeout_s: float) -> bool:
    return _WORKER.equal(a, b, timeout_s)


def _symbolic_equal(a: str, b: str, timeout_s: float | None) -> bool:
    """Rule 5: time-limited sympy equivalence of two cleaned answers (False when unsure)."""
    if not timeout_s or timeout_s <= 0:
        return False
    sa, sb = _to_sympy(a), _to_sympy(b)
    if sa is None or sb is None:
        return False
    return _symbolic_cached(sa, sb, float(timeout_s))
