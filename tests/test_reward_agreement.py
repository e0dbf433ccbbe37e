r"""Our verifier against the paper's rule grader, mathruler (`mathruler.grader.grade_answer`).

A generated corpus of answer forms per kind -- integers with separators, fractions, decimals,
percents, degrees, units in \text{}, sqrt and pi forms, expressions, tuples, intervals, letters,
words -- each form graded against every other form of its kind (the equal pairs and the near
misses alike). `grade(response, gold)` must say what mathruler says on the boxed content for
every pair; the documented differences (zppo_fast/reward.py's docstring) are tested one by one
below, not counted as agreement.
"""

from __future__ import annotations

import functools
import random
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import pytest
from mathruler.grader import extract_boxed_content, grade_answer

from zppo_fast.reward import extract_boxed, grade


def _integer_forms(n: int) -> list[str]:
    return [str(n), f"{n:,}", f"{n:,}".replace(",", "{,}"), f"{n}.0", f"0{n}", str(n + 1), str(-n),
            f"\\text{{{n}}}", f"${n}$", f"x = {n}", f"{n}\\%", f"{n} \\text{{ cm}}"]


def _fraction_forms(q: Fraction) -> list[str]:
    a, b = q.numerator, q.denominator
    return [f"{a}/{b}", f"\\frac{{{a}}}{{{b}}}", f"\\dfrac{{{a}}}{{{b}}}", f"{2 * a}/{2 * b}", f"{b}/{a}",
            f"-\\frac{{{a}}}{{{b}}}", f"\\frac{{-{a}}}{{{b}}}", f"{float(q):.6g}", f"{float(q):.2f}", f"{a // b}"]


def _decimal_forms(cents: int) -> list[str]:
    whole, frac = divmod(cents, 100)
    return [f"{whole}.{frac:02d}", f"{whole}.{frac:02d}0", f"{Fraction(cents, 100)}", f"{whole}.{frac + 1:02d}",
            f"{whole}.{frac:02d}".rstrip("0"), f"{whole + 1}.{frac:02d}", f"\\frac{{{cents}}}{{100}}"]


FIXED = {
    "percent": ["25\\%", "25%", "25", "0.25", "26\\%", "25 \\text{ percent}", "\\frac{1}{4}"],
    "degree": ["30^\\circ", "30^{\\circ}", "30 degrees", "30", "31^\\circ", "30 \\text{ degrees}",
               "\\frac{\\pi}{6}"],
    "unit": ["66 \\text{ cm}", "66\\text{ cm}", "66 cm", "66", "66 \\text{ meters}", "67 \\text{ cm}",
             "66 \\text{ kg}", "66 \\mbox{ cm}", "0.66 \\text{ m}", "5 \\text{ hours}", "5"],
    # sympy's simplify makes these the slow kinds: few forms, each pair still a real case
    "sqrt": ["2\\sqrt{2}", "\\sqrt{8}", "2\\sqrt2", "3\\sqrt{2}", "2.828", "\\frac{\\sqrt{2}}{2}",
             "\\frac{1}{\\sqrt{2}}"],
    "pi": ["2\\pi", "\\pi \\cdot 2", "6.28", "\\frac{\\pi}{2}", "\\pi/2", "\\frac{2\\pi}{4}"],
    "expression": ["x+1", "1+x", "(x-1)(x+1)", "x^2-1", "2x", "x \\cdot 2", "y+1"],
    "tuple": ["(1,2)", "(1, 2)", "(2,1)", "[1,2]", "(1,2,3)", "(\\frac{1}{2}, 3)", "(0.5,3)", "(1/2, 3)",
              "\\left( 1, 2 \\right)", "(1,2]"],
    "interval": ["(-\\infty, 3]", "(-\\infty,3)", "[0, 1)", "[0,1]", "(0,1)", "[0, 1]", "(-\\infty, 3)",
                 "(3, \\infty)"],
    "letter": ["A", "a", "(A)", "B", "\\text{A}", "\\text{(A)}", "A.", "\\textbf{A}", "b"],
    "word": ["yes", "Yes", "\\text{Yes}", "no", "blue", "Blue", "\\text{blue}", "red", "North", "north",
             "\\text{north }", "even", "odd"],
}


def corpus(seed: int = 0) -> dict[str, list[str]]:
    """Answer forms by kind: the fixed lists above plus seeded random numbers."""
    rng = random.Random(seed)
    kinds = dict(FIXED)
    for k in range(3):
        kinds[f"integer_{k}"] = _integer_forms(rng.choice([rng.randint(2, 999), rng.randint(1000, 999_999)]))
        kinds[f"fraction_{k}"] = _fraction_forms(Fraction(rng.randint(1, 99), rng.randint(2, 99)))
        kinds[f"decimal_{k}"] = _decimal_forms(rng.randint(101, 99_989))
    return kinds


PAIRS = [(kind, given, gold) for kind, forms in corpus().items() for gold in forms for given in forms]


@functools.cache
def mathruler_verdicts() -> tuple[bool, ...]:
    """mathruler on every pair, in this process (the reference), computed once."""
    return tuple(grade_answer(given, gold) for _, given, gold in PAIRS)


def test_corpus_is_balanced():
    """Both outcomes occur in every kind, so agreement is not reached by always saying one thing."""
    by_kind: dict[str, set[bool]] = {}
    for (kind, _, _), verdict in zip(PAIRS, mathruler_verdicts()):
        by_kind.setdefault(kind, set()).add(verdict)
    assert all(v == {True, False} for v in by_kind.values()), by_kind
    assert len(PAIRS) > 1000


def test_agrees_with_mathruler_on_the_corpus():
    responses = [f"Reasoning first. So the answer is \\boxed{{{given}}}." for _, given, _ in PAIRS]
    assert all(extract_boxed_content(r) == given for r, (_, given, _) in zip(responses, PAIRS))
    # ours runs mathruler in its worker process: grade in a thread while this one computes the reference
    with ThreadPoolExecutor(1) as pool:
        ours = pool.submit(lambda: [grade(r, gold) for r, (_, _, gold) in zip(responses, PAIRS)])
        reference = mathruler_verdicts()
        ours = ours.result()
    disagree = [(kind, given, gold, score) for (kind, given, gold), score, ref in zip(PAIRS, ours, reference)
                if score != float(ref)]
    assert not disagree, f"{len(disagree)} of {len(PAIRS)} pairs disagree, e.g. {disagree[:5]}"


def test_extraction_agrees_with_mathruler():
    for _, given, _ in PAIRS:
        text = f"First \\boxed{{0}}, then <think>\\boxed{{1}}</think> \\boxed{{{given}}} end"
        assert extract_boxed(text) == extract_boxed_content(text) == given.strip()


# --- The documented differences (zppo_fast/reward.py), each with mathruler's own verdict ------------


def test_difference_1_extraction_reads_tex_as_tex():
    spaced, escaped = r"so \boxed {42}", r"so \boxed{\{1, 2\}}"
    assert grade(spaced, "42") == 1.0 and extract_boxed_content(spaced) == "None"
    assert extract_boxed(escaped) == r"\{1, 2\}" and grade(escaped, r"\{1,2\}") == 1.0
    assert extract_boxed_content(escaped) == r"\{1, 2\}"  # by luck: \{ and \} balance each other
    lone = r"\boxed{\left\{ 1 \right.}"  # one escaped brace: mathruler's count never closes the box
    assert extract_boxed(lone) == r"\left\{ 1 \right." and extract_boxed_content(lone) == "None"


def test_difference_2_no_answer_never_scores():
    assert grade_answer(extract_boxed_content("I do not know."), "None")  # mathruler rewards no box
    assert grade("I do not know.", "None") == 0.0
    assert grade(r"\boxed{None}", "None") == 1.0  # a boxed None is an answer like any other
    assert grade_answer("", "") and grade(r"\boxed{}", "") == 0.0
    assert grade(r"\boxed{42", "42") == 0.0  # unbalanced last box: no answer


@pytest.mark.parametrize("gold", ["42", "x+1", r"\frac{1}{2}"])
def test_difference_4_identical_strings(gold):
    assert grade_answer(gold, gold) and grade(rf"\boxed{{{gold}}}", gold) == 1.0
