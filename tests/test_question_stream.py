"""zppo_fast.data.QuestionStream: distinct ids in every batch, epochs that still cover every id
once, and a saved position that resumes exactly (also in the middle of an epoch boundary)."""

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zppo_fast.data import QuestionStream


def reloaded(stream: QuestionStream, ids: list[int], seed: int) -> QuestionStream:
    """A fresh stream at `stream`'s saved position, through a JSON round trip (as a checkpoint may be)."""
    other = QuestionStream(ids, seed=seed)
    other.load_state_dict(json.loads(json.dumps(stream.state_dict())))
    return other


@settings(max_examples=150, deadline=None)
@given(size=st.integers(1, 40), data=st.data(), seed=st.integers(0, 3))
def test_batches_are_distinct_fair_and_resume_exactly(size, data, seed):
    batch_size = data.draw(st.integers(1, size), label="batch_size")
    steps = data.draw(st.integers(1, 4 * size // batch_size + 3), label="steps")  # several epochs
    ids = [7 * i + 3 for i in range(size)]  # not 0..n-1: the stream must return ids, not positions
    stream = QuestionStream(ids, seed=seed)
    batches, states = [], []
    taken = Counter()
    for _ in range(steps):
        batch = stream.next_batch(batch_size)
        assert len(batch) == batch_size and len(set(batch)) == batch_size, batch
        assert set(batch) <= set(ids)
        taken.update(batch)
        # every id has been taken as many times as the finished epochs, or once more
        counts = [taken[q] for q in ids]
        finished = stream.epoch + (stream.index == size)
        assert max(counts) - min(counts) <= 1 and min(counts) == finished, (counts, stream.state_dict())
        batches.append(batch)
        states.append(stream.state_dict())

    # Resume from a drawn step, and from the first step that ended inside an epoch boundary
    # (positions taken ahead of the index), if any: the same batches follow.
    split = data.draw(st.integers(0, steps - 1), label="split")
    inside = [k for k, s in enumerate(states) if s["ahead"]]
    for k in {split, *inside[:1]}:
        replay = QuestionStream(ids, seed=seed)
        for _ in range(k + 1):
            replay.next_batch(batch_size)
        resumed = reloaded(replay, ids, seed)
        assert [resumed.next_batch(batch_size) for _ in range(steps - k - 1)] == batches[k + 1:]


def test_boundary_batch_takes_the_rest_then_new_ids():
    """10 ids, batches of 4: the third batch has the epoch's last 2 ids, then the first 2 ids of the
    next epoch's order that are not among them."""
    ids = list(range(10))
    stream = QuestionStream(ids, seed=5)
    first = stream.next_batch(4) + stream.next_batch(4)
    rest = [q for q in stream._shuffle(0) if q not in first]
    third = stream.next_batch(4)
    assert third[:2] == rest
    assert third[2:] == [q for q in stream._shuffle(1) if q not in rest][:2]
    assert stream.epoch == 1


def test_a_batch_larger_than_the_data_set_is_an_error():
    with pytest.raises(ValueError, match="a batch of 16 distinct questions needs at least 16 .* has 10"):
        QuestionStream(list(range(10))).next_batch(16)


def test_a_position_saved_before_issue_14_still_loads():
    stream = QuestionStream(list(range(10)), seed=1)
    stream.load_state_dict({"epoch": 2, "index": 4})
    assert stream.next_batch(6) == stream._shuffle(2)[4:]
