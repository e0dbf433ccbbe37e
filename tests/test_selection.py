"""ZPPO's cap and priority (Algorithm 1, steps 3-5): hand-worked cases and properties."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zppo_fast.selection import aug_cap, replay_count, select_reformulations, teacher_questions

T, F = True, False


def test_cap_binds_between_a_questions_bcq_and_ncq():
    # Hard: 0 (0.0), 2 (1/8), 1 (2/8), 4 (3/8); 3 is easy. Question 2 has no BCQ.
    # Slots: q0 BCQ, q0 NCQ, q2 NCQ, q1 BCQ -> cap reached, q1's NCQ dropped, q4 never reached.
    accs = [0.0, 0.25, 0.125, 0.75, 0.375]
    eligible = [T, T, F, T, T]
    assert select_reformulations(accs, eligible, 4) == [
        (0, "bcq"), (0, "ncq"), (2, "ncq"), (1, "bcq"),
    ]


def test_pre_cap_keeps_the_lowest_accuracy_questions():
    # cap 2 keeps only q1 and q0 (lowest two); both have BCQ + NCQ, so q1 fills the cap alone.
    assert select_reformulations([0.25, 0.0, 0.125], [T, T, T], 2) == [(1, "bcq"), (1, "ncq")]


def test_ties_are_broken_by_batch_index():
    accs = [0.25, 0.0, 0.25, 0.0]
    assert select_reformulations(accs, [T, T, T, T], 3) == [(1, "bcq"), (1, "ncq"), (3, "bcq")]
    assert select_reformulations(accs, [F, F, F, F], 3) == [(1, "ncq"), (3, "ncq"), (0, "ncq")]


def test_fewer_hard_questions_than_cap():
    assert select_reformulations([0.125, 0.875, 0.0], [T, T, F], 10) == [
        (2, "ncq"), (0, "bcq"), (0, "ncq"),
    ]


def test_cap_zero_and_no_hard_questions():
    assert select_reformulations([0.0, 0.1], [T, T], 0) == []
    assert select_reformulations([0.5, 0.75, 1.0], [T, T, T], 5) == []
    assert select_reformulations([], [], 5) == []


def test_accuracy_exactly_half_is_not_hard():
    assert select_reformulations([0.5, 0.4999], [T, T], 4) == [(1, "bcq"), (1, "ncq")]


def test_single_kind_ablations():
    accs = [0.0, 0.125, 0.25]
    eligible = [F, T, T]
    # BCQ only: q0 cannot yield a BCQ, so it takes no slot.
    assert select_reformulations(accs, eligible, 1, kinds=("bcq",)) == [(1, "bcq")]
    assert select_reformulations(accs, eligible, 5, kinds=("bcq",)) == [(1, "bcq"), (2, "bcq")]
    assert select_reformulations(accs, eligible, 2, kinds=("ncq",)) == [(0, "ncq"), (1, "ncq")]
    # The order of `kinds` does not matter.
    assert select_reformulations(accs, eligible, 3, kinds=("ncq", "bcq")) == (
        select_reformulations(accs, eligible, 3)
    )


def test_teacher_is_asked_about_the_pre_cap_questions_only_when_ncq_is_on():
    accs = [0.25, 0.0, 0.75, 0.125, 0.0, 0.375]  # hard: 1, 4 (0.0), 3, 0, 5; 2 is easy
    assert teacher_questions(accs, 3) == [1, 4, 3]
    assert teacher_questions(accs, 3, kinds=("ncq",)) == [1, 4, 3]
    assert teacher_questions(accs, 3, kinds=("bcq",)) == [1, 4, 3, 0, 5]  # eligibility decides pre-cap
    assert teacher_questions(accs, 0) == [] and teacher_questions([0.5, 1.0], 4) == []


def test_bad_arguments():
    with pytest.raises(ValueError):
        select_reformulations([0.0], [T, T], 1)
    with pytest.raises(ValueError):
        select_reformulations([0.0], [T], -1)
    with pytest.raises(ValueError):
        select_reformulations([0.0], [T], 1, kinds=())
    with pytest.raises(ValueError):
        select_reformulations([0.0], [T], 1, kinds=("hint",))


@pytest.mark.parametrize(
    "b_new, rho, expected",
    [(384, 0.25, 96), (10, 0.25, 3), (6, 0.25, 2), (2, 0.25, 1), (3, 0.25, 1), (1, 0.25, 0),
     (0, 0.25, 0), (8, 0.0, 0)],
)
def test_rounding_halves_up(b_new, rho, expected):
    assert replay_count(b_new, rho) == expected
    assert aug_cap(b_new, rho) == expected


def test_rounding_rejects_negatives():
    with pytest.raises(ValueError):
        replay_count(-1, 0.25)
    with pytest.raises(ValueError):
        aug_cap(4, -0.25)


questions = st.lists(
    st.tuples(st.integers(0, 8).map(lambda k: k / 8), st.booleans()), max_size=24
)


@settings(max_examples=300, deadline=None)
@given(questions, st.integers(0, 30), st.sampled_from([("bcq", "ncq"), ("bcq",), ("ncq",)]))
def test_selection_properties(qs, cap, kinds):
    accs = [a for a, _ in qs]
    eligible = [e for _, e in qs]
    out = select_reformulations(accs, eligible, cap, kinds=kinds)

    def offered(i):
        return [k for k in ("bcq", "ncq") if k in kinds and (k == "ncq" or eligible[i])]

    assert len(out) <= cap
    assert len(set(out)) == len(out)
    for i, kind in out:
        assert accs[i] < 0.5 and kind in offered(i)
    # Ascending accuracy (ties by index), and a question's instances are adjacent, BCQ first.
    keys = [(accs[i], i, kind != "bcq") for i, kind in out]
    assert keys == sorted(keys)
    # Nothing is left out while there is room, and nothing left out beats anything taken.
    candidates = [i for i in range(len(qs)) if accs[i] < 0.5 and offered(i)]
    assert len(out) == min(cap, sum(len(offered(i)) for i in candidates))
    taken = {i for i, _ in out}
    for j in candidates:
        if j not in taken:
            assert all((accs[i], i) < (accs[j], j) for i in taken)


@settings(max_examples=300, deadline=None)
@given(questions, st.integers(0, 30), st.sampled_from([("bcq", "ncq"), ("bcq",), ("ncq",)]))
def test_asking_the_teacher_only_what_can_be_used_builds_the_same_instances(qs, cap, kinds):
    accs = [a for a, _ in qs]
    eligible = [e for _, e in qs]
    asked = set(teacher_questions(accs, cap, kinds))
    # A question the teacher was not asked about has no teacher-correct rollout: not BCQ-eligible.
    known = [e and i in asked for i, e in enumerate(eligible)]
    assert select_reformulations(accs, known, cap, kinds=kinds) == select_reformulations(accs, eligible, cap, kinds=kinds)
