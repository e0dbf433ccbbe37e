r"""The verifier: a binary reward from the last ``\boxed{...}`` answer of a response.

Public API
----------
``grade(response, gold) -> float``
    1.0 when the content of the response's last ``\boxed{...}`` is equivalent to ``gold`` under
    the paper's rule grader, mathruler's ``grade_answer``; else 0.0. Never raises on model output:
    a non-string, box-less, malformed or pathological response scores 0.0.
``extract_boxed(text) -> str | None``
    The stripped content of the LAST ``\boxed{...}`` (nested braces handled), ``None`` when
    there is none or the last one is unbalanced.
``boxed_answer(text) -> str``
    The last box as the response wrote it (stripped), or ``NO_ANSWER``: what NCQ lists.
``final_answer(text) -> str``
    The last box, normalized (``normalize_answer``), or ``NO_ANSWER``: the key NCQ deduplicates
    its listed answers by, and the copy metric's.
``normalize_answer(answer) -> str``
    Our display / dedup normalizer (not the grader's equivalence).
``NO_ANSWER``
    The marker for "this rollout has no boxed answer".

Equivalence is the paper's grader (mathruler.grader.grade_answer, itself PRM800K's)
------------------------------------------------------------------------------------
``grade`` extracts the last box and asks ``mathruler.grader.grade_answer(box, gold)``: the mathd
normalizer (Hendrycks' MATH), then PRM800K's normalizer (units such as cm / degrees / hours and
``\text{ ...}`` units dropped, percent and dollar signs dropped, thousands separators, LaTeX read
by pylatexenc), then sympy's ``simplify`` of the difference, with the paper's two rules on
numbers (an integer gold needs an integer answer; two fractions must be written alike), and
tuples / intervals element by element with the same brackets. Every accept and reject is
mathruler's; tests/test_reward_agreement.py measures it on a generated corpus. Where we differ,
and why (each tested there):

1. Extraction is ours (``extract_boxed``), not mathruler's ``extract_boxed_content``: ``\boxed {x}``
   (a space TeX accepts) is read; ``\{`` / ``\}`` are characters, not groups, so ``\boxed{\{1\}}``
   closes where TeX closes it; an unbalanced last box is no answer.
2. No box, an unbalanced box or an empty box scores 0. mathruler's extractor returns the text
   "None" for a missing box, which its grader then accepts against a gold answer "None", and it
   accepts an empty answer against an empty gold: a reward for answering nothing.
3. ``grade_answer`` runs in a worker process killed after ``GRADE_TIMEOUT_S`` seconds (sympy can
   run for minutes on a crafted answer; mathruler has no limit); a timeout, or an exception
   inside mathruler, scores 0.
4. Identical strings (box == gold after stripping) are accepted without the worker, as mathruler
   accepts them too (both normalizers map equal inputs to equal outputs).

Normalization (``normalize_answer``; NCQ dedup, the choice grader, copy metrics) is ours, both
sides identically: unwrap ``\text{..}``/``\mathrm{..}``/``\boxed{..}`` and similar wrappers;
``\dfrac``/``\tfrac`` -> ``\frac``; ``\frac12`` -> ``\frac{1}{2}``; drop ``\left``/``\right``, TeX
spacing, ``$`` and ``\$``; the Unicode minus as ``-``; lowercase; drop all whitespace and trailing
periods; strip matching outer braces; drop a short variable assignment (``x = 5`` -> ``5``);
remove thousands separators (``1,000``, ``1{,}000``) when the whole answer is such a number; a
number is rewritten canonically (``007`` -> ``7``, ``.50`` -> ``0.5``, ``\frac{-3}{4}`` -> ``-3/4``).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
from fractions import Fraction
from functools import lru_cache

__all__ = [
    "GRADE_TIMEOUT_S",
    "NO_ANSWER",
    "boxed_answer",
    "extract_boxed",
    "final_answer",
    "grade",
    "normalize_answer",
]

NO_ANSWER = "[no answer]"
"""What NCQ leaves out of its answer list for a rollout without a boxed answer."""

GRADE_TIMEOUT_S = 5.0
"""Wall-clock limit of one mathruler comparison (its sympy step can run for minutes)."""


# --- Extraction ----------------------------------------------------------------------------

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


def boxed_answer(text: str) -> str:
    """The last boxed answer as the response wrote it (stripped), or ``NO_ANSWER``: what NCQ
    shows the student. An empty box counts as no answer."""
    return extract_boxed(text) or NO_ANSWER


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


def _clean(s: str) -> str:
    """The textual part of the normalizer (see the module docstring for the rule list)."""
    if _WRAPPER_PRESENT_RE.search(s):
        s = _unwrap(s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _LEFT_RIGHT_RE.sub("", s)
    s = _SPACING_RE.sub("", s)
    s = s.replace("\\$", "").replace("$", "").replace("\u2212", "-")  # U+2212: Unicode minus
    s = "".join(s.lower().split())
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


def normalize_answer(answer: str) -> str:
    r"""Canonical form of one answer for display and dedup: cleaned text, or a number in
    canonical notation (see the module docstring). Not the grader's equivalence."""
    if not isinstance(answer, str):
        return ""
    s = _clean(answer)
    return _canonical_number(s) or s


# --- Numbers (canonical notation only) ----------------------------------------------------

_DEC_RE = re.compile(r"([+-]?)(\d*)(?:\.(\d*))?", re.ASCII)  # ASCII: "٣" is not a digit here
_FRAC_RE = re.compile(r"([+-]?)\\frac\{([^{}]*)\}\{([^{}]*)\}")


def _decimal(s: str) -> tuple[bool, str] | None:
    """``"-007.50"`` -> (True, "7.5"): negative?, canonical digits; None when not a decimal."""
    m = _DEC_RE.fullmatch(s)
    if not m or not (m.group(2) or m.group(3)):
        return None
    whole, frac = m.group(2).lstrip("0") or "0", (m.group(3) or "").rstrip("0")
    digits = whole + ("." + frac if frac else "")
    return m.group(1) == "-" and digits != "0", digits


def _canonical_number(s: str) -> str | None:
    """A whole cleaned answer as a canonical number (``a/b`` kept as written), or None."""
    m = _FRAC_RE.fullmatch(s)
    if m:  # \frac{A}{B} with numeric A, B; a sign may sit outside or inside
        s = f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    parts = s.split("/")
    if len(parts) > 2:
        return None
    nums = [_decimal(p) for p in parts]
    if any(n is None for n in nums):
        return None
    negative = sum(n[0] for n in nums) % 2 == 1 and nums[0][1] != "0"
    return ("-" if negative else "") + "/".join(n[1] for n in nums)


# --- Grading -------------------------------------------------------------------------------


def grade(response: str, gold: str) -> float:
    r"""1.0 if the last ``\boxed{...}`` of ``response`` is equivalent to ``gold`` (mathruler's
    ``grade_answer``, with the differences of the module docstring), else 0.0.

    ``gold`` may be a string or an int/float/Fraction (stringified); any other gold type is
    a data bug and raises TypeError. Anything wrong with ``response`` scores 0.0.
    """
    if not isinstance(gold, str):
        if isinstance(gold, bool) or not isinstance(gold, (int, float, Fraction)):
            raise TypeError(f"gold answer must be a string, got {type(gold).__name__}")
        gold = str(gold)
    box = extract_boxed(response)
    if not box:
        return 0.0  # no box, an unbalanced one, or an empty one (difference 2)
    if box == gold.strip():
        return 1.0  # difference 4: mathruler accepts identical strings
    return 1.0 if _mathruler_cached(box, gold, float(GRADE_TIMEOUT_S)) else 0.0


# --- mathruler in a killable worker process -----------------------------------------------

_WORKER_SRC = r"""
import json, sys
try:
    from mathruler.grader import grade_answer
except Exception as e:
    sys.stdout.write("error: cannot import mathruler.grader (" + type(e).__name__ + ": " + str(e) + ")\n")
    sys.stdout.flush()
    sys.exit(1)
sys.stdout.write("ready\n"); sys.stdout.flush()
for line in sys.stdin:
    try:
        given, gold = json.loads(line)
        out = "1" if grade_answer(given, gold) else "0"
    except Exception:
        out = "0"
    sys.stdout.write(out + "\n"); sys.stdout.flush()
"""


class GraderUnavailable(RuntimeError):
    """mathruler cannot run here (not installed, or its worker cannot start): a setup error."""


class _MathrulerWorker:
    """One long-lived ``python -c`` process running mathruler; killed and restarted on timeout.

    A process, not a thread or SIGALRM: only a process can be stopped inside sympy's C-level
    big-integer work, and it works from any thread of the trainer.
    """

    _START_TIMEOUT_S = 120.0

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", _WORKER_SRC], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self._read_line(proc, self._START_TIMEOUT_S)
        if line != "ready":
            self._kill(proc)
            why = line or f"no answer within {self._START_TIMEOUT_S:.0f} s"
            raise GraderUnavailable(f"the math grader's worker ({sys.executable}) did not start: {why}; "
                                    "install the grader's packages: pip install mathruler pylatexenc sympy")
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

    def equal(self, given: str, gold: str, timeout_s: float) -> bool:
        """mathruler's ``grade_answer(given, gold)`` within ``timeout_s`` seconds (else False)."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            proc = self._proc
            try:
                proc.stdin.write(json.dumps([given, gold]) + "\n")
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


_WORKER = _MathrulerWorker()
atexit.register(_WORKER.close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_WORKER._after_fork)


@lru_cache(maxsize=8192)
def _mathruler_cached(given: str, gold: str, timeout_s: float) -> bool:
    return _WORKER.equal(given, gold, timeout_s)
