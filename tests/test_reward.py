r"""Tests for zppo_fast.reward: the binary verifier of the last \boxed{} answer.

Every expected value below follows from a rule of the paper's grader (mathruler's grade_answer,
PRM800K's) or one of the differences in zppo_fast/reward.py's docstring (the reason column names
it), not from running the code. tests/test_reward_agreement.py compares with mathruler itself.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mathruler.grader import grade_answer

from zppo_fast import reward
from zppo_fast.reward import NO_ANSWER, boxed_answer, extract_boxed, final_answer, grade, normalize_answer

BIG = "7" * 10_000  # 10,000 digits: past Python's 4300-digit int(str) limit
DEEP = 100_000

# (response, gold, expected, reason)
CASES = [
    # --- correct ---------------------------------------------------------------------------
    (r"The answer is \boxed{42}.", "42", 1.0, "same integer"),
    (r"\boxed{ 42 }", "42", 1.0, "spaces dropped"),
    (r"\boxed{042}", "42", 1.0, "leading zeros are not digits of the value"),
    (r"\boxed{-7}", "-7", 1.0, "negative integer"),
    (r"\boxed{-7}", "7", 0.0, "sign matters"),
    (r"\boxed{-0}", "0", 1.0, "minus zero is zero"),
    ("\\boxed{\u22123}", "-3", 0.0, "mathruler does not read the Unicode minus"),
    (r"\boxed{3.50}", "3.5", 1.0, "trailing decimal zeros"),
    (r"\boxed{.5}", "0.5", 1.0, "bare leading dot"),
    (r"\boxed{2.0}", "2", 1.0, "integer-valued decimal equals the integer"),
    (r"\boxed{2.01}", "2", 0.0, "exact: no float tolerance"),
    (r"\boxed{1,000}", "1000", 1.0, "thousands separators"),
    (r"\boxed{1{,}234{,}567}", "1234567", 1.0, "TeX thousands separators"),
    (r"\boxed{1,2}", "12", 0.0, "1,2 is not a thousands-grouped number"),
    (r"\boxed{\$5}", "5", 1.0, r"\$ dropped"),
    (r"\boxed{$5$}", "5", 1.0, "surrounding $...$ dropped"),
    (r"\boxed{5.}", "5", 1.0, "trailing period dropped"),
    (r"\boxed{x = 5}", "5", 1.0, "short variable assignment dropped"),
    (r"\boxed{\text{Yes}}", "yes", 1.0, r"\text unwrapped, case-insensitive"),
    (r"\boxed{\text{(B)}}", "(b)", 1.0, "text answer, case-insensitive"),
    (r"\boxed{\textbf{blue}}", "red", 0.0, "different text"),
    # --- fractions vs decimals vs a/b --------------------------------------------------------
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0, "fraction equals decimal of the same value"),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0, "decimal equals fraction (symmetric)"),
    (r"\boxed{1/2}", r"\frac{1}{2}", 1.0, "a/b is \\frac{a}{b}"),
    (r"\boxed{\dfrac{1}{2}}", "1/2", 1.0, "\\dfrac is \\frac"),
    (r"\boxed{\tfrac{3}{4}}", "0.75", 1.0, "\\tfrac is \\frac"),
    (r"\boxed{\frac12}", "1/2", 1.0, "\\frac12 shorthand"),
    (r"\boxed{\left( \frac{1}{3}, 1 \right)}", "(1/3,1)", 1.0, "\\left/\\right dropped"),
    (r"\boxed{0.333}", "1/3", 0.0, "exact: a rounded decimal is not 1/3"),
    (r"\boxed{2/4}", "1/2", 0.0, "paper rule: two fractions must be written alike"),
    (r"\boxed{4/2}", "2", 0.0, "paper rule: an integer never equals a fraction"),
    (r"\boxed{-\frac{3}{4}}", "-0.75", 1.0, "negative fraction vs negative decimal"),
    (r"\boxed{\frac{-3}{4}}", r"-\frac{3}{4}", 1.0, "sign inside or outside \\frac"),
    (r"\boxed{\frac{3}{-4}}", "-3/4", 1.0, "sign in the denominator"),
    (r"\boxed{-\frac{3}{4}}", "3/4", 0.0, "sign matters for fractions"),
    (r"\boxed{1.5/3}", "0.5", 1.0, "a quotient with a decimal part compares by value"),
    (r"\boxed{1/0}", "1/0", 1.0, "not a number (zero denominator), but the same string"),
    (r"\boxed{1/0}", "2/0", 0.0, "zero denominators are not numbers; strings differ"),
    # --- second pass: degree / percent --------------------------------------------------------
    (r"\boxed{50\%}", "50", 1.0, "percent stripped in the second pass"),
    (r"\boxed{50}", r"50\%", 1.0, "percent on the gold side too"),
    (r"\boxed{50%}", "0.5", 0.0, "stripping is textual, not a division by 100"),
    (r"\boxed{30^\circ}", "30", 1.0, "^\\circ stripped"),
    (r"\boxed{30^{\circ}}", "30", 1.0, "^{\\circ} stripped"),
    (r"\boxed{30°}", "30", 0.0, "mathruler strips ^\\circ and 'degree', not the ° sign"),
    (r"\boxed{30\degree}", "30", 1.0, "\\degree stripped"),
    (r"\boxed{30 \text{ degrees}}", "30", 1.0, "a trailing 'degrees' stripped"),
    (r"\boxed{31^\circ}", "30", 0.0, "still has to be the same number"),
    # --- tuples and intervals -------------------------------------------------------------
    (r"\boxed{(1, 2)}", "(1,2)", 1.0, "spaces in a tuple"),
    (r"\boxed{(0.5, 1]}", r"(\frac{1}{2}, 1]", 1.0, "elementwise numeric comparison"),
    (r"\boxed{[0.5, 1]}", "(1/2, 1]", 0.0, "brackets must match"),
    (r"\boxed{(1, 2)}", "(1,2,3)", 0.0, "element counts must match"),
    # --- multiple boxes, <think> ----------------------------------------------------------
    (r"First \boxed{3}, then \boxed{5}.", "5", 1.0, "the last box counts"),
    (r"First \boxed{3}, then \boxed{5}.", "3", 0.0, "an earlier box does not count"),
    (r"<think>maybe \boxed{3}? no.</think> So \boxed{4}", "4", 1.0, "box after </think>"),
    (r"<think>maybe \boxed{3}? no.</think> So \boxed{4}", "3", 0.0, "boxes in <think> are earlier"),
    (r"\boxed{\boxed{6}}", "6", 1.0, "a nested \\boxed is unwrapped"),
    (r"\boxed{6}", r"\boxed{6}", 1.0, "a boxed gold is unwrapped"),
    # --- malformed ------------------------------------------------------------------------
    ("The answer is 42.", "42", 0.0, "no box"),
    (r"\boxed{}", "42", 0.0, "empty box"),
    (r"\boxed{   }", "", 0.0, "empty answer never matches, even an empty gold"),
    (r"\boxed{42", "42", 0.0, "unbalanced last box"),
    (r"\boxed{7} and \boxed{42", "7", 0.0, "unbalanced last box: no fallback to earlier one"),
    (r"\boxed{4}2}", "4", 1.0, "stray closing brace after a closed box"),
    (r"\boxed 42", "42", 0.0, "brace-less \\boxed is not accepted"),
    (r"\boxed {42}", "42", 1.0, "space before the brace is TeX-legal"),
    (r"\boxed{\{1, 2\}}", r"\{1,2\}", 1.0, "escaped braces are characters"),
    (r"\boxed{\left\{ 1 \right.}", r"\{1.", 1.0, "a lone \\{ does not unbalance the box"),
    ("\\boxed{42}\\", "42", 1.0, "trailing backslash"),
    (r"\boxed{4 2}", "42", 1.0, "whitespace is dropped everywhere"),
    (r"\boxed{forty-two}", "42", 0.0, "words are not numbers"),
    (r"\boxed{42\sqrt{}}", "42", 0.0, "integer gold needs a number"),
    # --- adversarial sizes ----------------------------------------------------------------
    (rf"\boxed{{{BIG}}}", BIG, 1.0, "10,000-digit integers, equal"),
    (rf"\boxed{{{BIG[:-1]}8}}", BIG, 0.0, "10,000-digit integers, last digit differs"),
    (rf"\boxed{{-{BIG}.0}}", f"-{BIG}", 0.0, "mathruler reads a 10,000-digit decimal as a float: inf"),
    (rf"\boxed{{{BIG}/{BIG}}}", f"{BIG}/{BIG}", 1.0, "huge fractions written alike"),
    (r"\boxed{0.5}", f"5{'0' * 9999}/1{'0' * 10000}", 0.0, "mathruler: past sympy's int-conversion limit"),
    (r"\boxed{0.5}", f"5{'0' * 9999}/1{'0' * 10001}", 0.0, "decimal vs huge fraction, /10"),
    ("\\boxed{" + "{" * DEEP + "9" + "}" * DEEP + "}", "9", 1.0, "100,000 nested braces"),
    ("\\boxed{" + "{" * DEEP + "9" + "}" * (DEEP - 1) + "}", "9", 0.0, "100,000 deep, unbalanced"),
    ("\\boxed{" * DEEP, "9", 0.0, "100,000 unclosed boxes"),
    ("}" * DEEP + "\\boxed{1}", "1", 1.0, "100,000 stray closing braces before the box"),
]


@pytest.mark.parametrize(
    "response,gold,expected,reason", CASES, ids=[c[3] for c in CASES]
)
def test_grade_table(response, gold, expected, reason):
    assert grade(response, gold) == expected, reason


@pytest.mark.parametrize(
    "response,gold,expected",
    [
        (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),  # equal surds (sympy)
        (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", 1.0),  # rationalized
        (r"\boxed{x+1}", "1+x", 1.0),  # commuted sum
        (r"\boxed{\pi/2}", r"\frac{\pi}{2}", 1.0),
        (r"\boxed{\sqrt{3}}", r"\sqrt{2}", 0.0),
        (r"\boxed{ab}", "ba", 1.0),  # mathruler: two letters are a product, and ab = ba
        (r"\boxed{\sqrt{4}}", "2", 0.0),  # an integer gold requires an integer answer
        (r"\boxed{7\frac{3}{4}}", r"\frac{31}{4}", 1.0),  # mathruler reads a mixed number
        (r"\boxed{66 \text{ cm}}", "66", 1.0),  # units dropped (the example)
        (r"\boxed{5 \text{ hours}}", "5", 1.0),
        (r"\boxed{5 \text{ apples}}", "5", 1.0),  # mathd: "\text{ " on the right is a unit
    ],
)
def test_grade_symbolic_and_units(response, gold, expected):
    assert grade(response, gold) == expected


def test_time_limit_kills_worker():
    worker = reward._MathrulerWorker()
    try:
        assert worker.equal("x+1", "1+x", 60.0) is True  # starts the worker
        # sympy evaluates 9**9**9 (370 million digits) before it can simplify: minutes of work
        assert worker.equal("9**9**9*x", "x", 0.5) is False  # over the limit: not equal
        assert worker._proc is None  # the late worker was killed, not left running
        assert worker.equal("x+3", "3+x", 60.0) is True  # and a fresh one starts
    finally:
        worker.close()


def test_missing_mathruler_is_a_clear_error(monkeypatch):
    worker = reward._MathrulerWorker()
    monkeypatch.setattr(reward, "_WORKER_SRC", reward._WORKER_SRC.replace("mathruler.grader", "mathruler.no_such"))
    with pytest.raises(reward.GraderUnavailable, match="cannot import mathruler.no_such.*pip install mathruler"):
        worker.equal("1", "2", 5.0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_gets_its_own_worker():
    assert grade(r"\boxed{x+4}", "4+x") == 1.0  # parent worker running
    pid = os.fork()
    if pid == 0:  # child: must not talk over the parent's pipe
        ok = grade(r"\boxed{y+5}", "5+y") == 1.0 and reward._WORKER._proc is not None
        reward._WORKER.close()
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert grade(r"\boxed{y+6}", "6+y") == 1.0  # parent's worker still answers correctly


def test_grade_from_threads():
    with ThreadPoolExecutor(4) as pool:
        out = list(pool.map(lambda n: grade(rf"\boxed{{{n}}}", str(n)), range(32)))
    assert out == [1.0] * 32


@pytest.mark.parametrize("bad", [None, 42, b"\\boxed{42}", ["\\boxed{42}"], object()])
def test_non_string_response_scores_zero(bad):
    assert grade(bad, "42") == 0.0
    assert final_answer(bad) == NO_ANSWER
    assert extract_boxed(bad) is None


def test_gold_types():
    assert grade(r"\boxed{42}", 42) == 1.0
    assert grade(r"\boxed{0.5}", Fraction(1, 2)) == 1.0
    with pytest.raises(TypeError):
        grade(r"\boxed{42}", None)  # a missing gold is a data bug, not a wrong answer


def test_extract_boxed():
    assert extract_boxed(r"a \boxed{\frac{1}{2}} b") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{1} \boxed{ 2 }") == "2"
    assert extract_boxed(r"\boxed{}") == ""
    assert extract_boxed("no box") is None
    assert extract_boxed(r"\boxed{1} \boxed{2") is None
    assert extract_boxed(r"\boxed{1} \boxed 2") == "1"  # brace-less \boxed is skipped
    assert extract_boxed("\\boxed{" + "{" * DEEP + "}" * DEEP + "}") == "{" * DEEP + "}" * DEEP


def test_boxed_answer_as_written():
    assert boxed_answer(r"so \boxed{ \frac{1}{2} \text{ cm} }") == r"\frac{1}{2} \text{ cm}"
    assert boxed_answer(r"\boxed{}") == boxed_answer("no box") == boxed_answer(r"\boxed{1") == NO_ANSWER


def test_final_answer_and_marker():
    assert NO_ANSWER == "[no answer]"
    assert final_answer("I give up.") == NO_ANSWER
    assert final_answer(r"\boxed{}") == NO_ANSWER
    assert final_answer(r"\boxed{1") == NO_ANSWER
    assert final_answer(r"\boxed{1} then \boxed{\dfrac{1}{2}}") == "1/2"
    assert final_answer(r"\boxed{x = 1,000}") == "1000"
    assert final_answer(r"\boxed{\text{Paris}}") == "paris"
    # one normalizer: equal display forms for answers the grader treats as the same text
    assert final_answer(r"\boxed{\frac{-3}{4}}") == final_answer(r"\boxed{-3/4}") == "-3/4"


def test_normalize_answer():
    assert normalize_answer(r"\left( 1, 2 \right)") == "(1,2)"
    assert normalize_answer(r"50\%") == r"50\%"
    assert normalize_answer(r"\frac{-3}{4}") == normalize_answer(r"\frac{3}{-4}") == "-3/4"
    assert normalize_answer("007.50") == "7.5"
    assert normalize_answer(BIG + ".000") == BIG


# --- properties ----------------------------------------------------------------------------

TEX_ALPHABET = st.sampled_from(
    list("0123456789{}\\/.,-+%$^()[]xyz= ") + [r"\boxed{", r"\frac", r"\sqrt", r"\text{", "°"]
)
tex_like = st.lists(TEX_ALPHABET, max_size=40).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(response=st.one_of(st.text(), tex_like), gold=st.one_of(st.text(), tex_like))
def test_grade_never_raises(response, gold):
    assert grade(response, gold) in (0.0, 1.0)
    assert isinstance(final_answer(response), str)


@settings(max_examples=200, deadline=None)
# mathruler compares integers through floats: below 2**53 they are exact (above, n + 1 == n)
@given(n=st.integers(min_value=-(2**53), max_value=2**53 - 2))
def test_grade_integers(n):
    assert grade(f"\\boxed{{{n}}}", str(n)) == 1.0
    # thousands separators: as mathruler reads them (it rejects 1,000,000,000: its comma
    # stripping skips every other group of a 3-group number; the paper's grader, so ours)
    assert grade(f"\\boxed{{{n:,}}}", str(n)) == float(grade_answer(f"{n:,}", str(n)))
    assert grade(f"\\boxed{{{n + 1}}}", str(n)) == 0.0


@settings(max_examples=200, deadline=None)
@given(q=st.fractions(max_denominator=10**6).filter(lambda q: abs(q.numerator) < 2**53))
def test_grade_fractions(q):
    assert grade(f"\\boxed{{{q}}}", str(q)) == 1.0
    sign = "-" if q < 0 else ""
    frac = f"{sign}\\frac{{{abs(q.numerator)}}}{{{q.denominator}}}"
    if q.denominator > 1:  # \frac{a}{b} (reduced) is a/b; an integer is not a fraction
        assert grade(f"\\boxed{{{frac}}}", str(q)) == 1.0
    assert grade(f"\\boxed{{{q + 1}}}", str(q)) == 0.0


@settings(max_examples=200, deadline=None)
@given(q=st.fractions(max_denominator=10**6).filter(lambda q: q.denominator > 1 and abs(q) < 10**6))
def test_grade_terminating_decimals(q):
    # a fraction with denominator 2^i 5^j has a finite decimal expansion of the same value
    q = Fraction(q.numerator, 2 ** (q.denominator % 7) * 5 ** (q.denominator % 5))
    digits = 20
    scaled = abs(q) * 10**digits
    assert scaled.denominator == 1
    whole, frac = divmod(int(scaled), 10**digits)
    decimal = f"{'-' if q < 0 else ''}{whole}.{frac:0{digits}d}"
    if q.denominator > 1:
        assert grade(f"\\boxed{{{decimal}}}", str(q)) == 1.0
