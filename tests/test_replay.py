"""Tests of zppo_fast.replay.PromptReplayBuffer against a plain-Python model of the paper's rules.

The model below is the specification: if the two disagree after any operation, the buffer
is wrong. The C++ ring also has its own tests (csrc/test_replay_ring.cpp, run by ctest and
under ThreadSanitizer/AddressSanitizer).
"""

import json
import math
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zppo_fast import _replay
from zppo_fast.replay import HISTORY_DTYPE, PromptReplayBuffer

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class ModelBuffer:
    """The replay rules, written for clarity: a dict in insertion (= FIFO) order."""

    def __init__(self, capacity, threshold=0.5):
        self.capacity, self.threshold = capacity, threshold
        self.live = {}  # qid -> {"step_admitted", "acc_admitted", "last_acc", "visits"}
        self.history = []  # HISTORY_DTYPE field tuples

    def _exit(self, qid, rec, step, graduated):
        self.history.append(
            (qid, rec["step_admitted"], rec["acc_admitted"], step, graduated, rec["visits"], rec["last_acc"])
        )

    def update(self, ids, accs, step):
        admitted, graduated, evicted = [], [], []
        for q, a in zip(ids, accs):  # 1-2: graduate or revisit what is already in
            if q in self.live:
                rec = self.live[q]
                rec["visits"] += 1
                rec["last_acc"] = a
                if a >= self.threshold:
                    del self.live[q]
                    self._exit(q, rec, step, True)
                    graduated.append(q)
        for q, a in zip(ids, accs):  # 3: admit the new hard ones, in order
            if q not in self.live and q not in graduated and a < self.threshold:
                self.live[q] = {"step_admitted": step, "acc_admitted": a, "last_acc": a, "visits": 0}
                admitted.append(q)
        while len(self.live) > self.capacity:  # 4: FIFO eviction
            q = next(iter(self.live))
            self._exit(q, self.live.pop(q), step, False)
            evicted.append(q)
        return admitted, graduated, evicted


def assert_same(buf, model):
    assert buf.ids().tolist() == list(model.live)
    assert len(buf) == len(model.live)
    live = buf.state_dict()["live"]
    for i, (q, rec) in enumerate(model.live.items()):
        assert live["qid"][i] == q
        for field in ("step_admitted", "acc_admitted", "last_acc", "visits"):
            assert live[field][i] == rec[field], (q, field)
    assert buf.history().tolist() == model.history


def state_equal(a, b):
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


# --- semantics: random operation sequences -----------------------------------------------

ACCURACY = st.sampled_from([i / 8 for i in range(9)])
EXTREME_IDS = [INT64_MIN, INT64_MIN + 1, -1, 0, 1, INT64_MAX - 1, INT64_MAX]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    capacity=st.integers(1, 6),
    universe=st.lists(st.integers(INT64_MIN, INT64_MAX), min_size=1, max_size=12, unique=True),
    data=st.data(),
)
def test_random_operations_match_model(capacity, universe, data):
    universe = sorted(set(universe) | set(EXTREME_IDS[: data.draw(st.integers(0, len(EXTREME_IDS)))]))
    buf, model = PromptReplayBuffer(capacity, seed=data.draw(st.integers(0, 2**32))), ModelBuffer(capacity)
    for step in range(data.draw(st.integers(1, 25))):
        op = data.draw(st.sampled_from(["update", "update", "update", "sample", "reload", "contains"]))
        if op == "update":
            ids = data.draw(st.lists(st.sampled_from(universe), unique=True, max_size=len(universe)))
            accs = [data.draw(ACCURACY) for _ in ids]
            got = buf.update(np.array(ids, dtype=np.int64), accs, step)
            want = model.update(ids, accs, step)
            assert (got.admitted.tolist(), got.graduated.tolist(), got.evicted.tolist()) == want
        elif op == "sample":
            k = data.draw(st.integers(0, capacity + 2))
            drawn = buf.sample(k).tolist()
            assert len(drawn) == min(k, len(model.live))
            assert len(set(drawn)) == len(drawn) and set(drawn) <= set(model.live)
        elif op == "reload":
            fresh = PromptReplayBuffer(capacity, seed=12345)
            fresh.load_state_dict(buf.state_dict())
            assert state_equal(fresh.state_dict(), buf.state_dict())
            buf = fresh
        else:
            for q in universe:
                assert (q in buf) == (q in model.live)
        assert_same(buf, model)


def test_capacity_one():
    buf, model = PromptReplayBuffer(1), ModelBuffer(1)
    for step, (ids, accs) in enumerate(
        [([5, 6, 7], [0.0, 0.1, 0.2]), ([7, 8], [0.3, 0.0]), ([8], [0.9]), ([9, 8], [0.5, 0.0]), ([8], [0.4])]
    ):
        got = buf.update(ids, accs, step)
        assert (got.admitted.tolist(), got.graduated.tolist(), got.evicted.tolist()) == model.update(ids, accs, step)
        assert_same(buf, model)
    assert buf.ids().tolist() == [8] and len(buf) == 1
    assert buf.sample(3).tolist() == [8]


def test_capacity_ten_thousand():
    rng = np.random.default_rng(0)
    buf, model = PromptReplayBuffer(10_000), ModelBuffer(10_000)
    # A step admitting 2.5x the capacity evicts its own oldest admissions.
    ids = rng.permutation(40_000)[:25_000] - 20_000
    accs = np.zeros(len(ids))
    got = buf.update(ids, accs, 0)
    want = model.update(ids.tolist(), accs.tolist(), 0)
    assert got.evicted.tolist() == want[2] == ids[:15_000].tolist()
    assert_same(buf, model)
    # Then graduations free room before anything is evicted.
    for step in range(1, 4):
        ids = rng.choice(np.arange(-20_000, 20_000), size=12_000, replace=False)
        accs = rng.integers(0, 9, size=len(ids)) / 8
        got = buf.update(ids, accs, step)
        want = model.update(ids.tolist(), accs.tolist(), step)
        assert (got.admitted.tolist(), got.graduated.tolist(), got.evicted.tolist()) == want
        assert_same(buf, model)


def test_full_int64_range_ids():
    ids = np.array(EXTREME_IDS, dtype=np.int64)
    buf = PromptReplayBuffer(len(ids))
    buf.update(ids, np.zeros(len(ids)), 3)
    assert buf.ids().tolist() == EXTREME_IDS
    assert all(int(q) in buf for q in ids) and 2 not in buf
    assert sorted(buf.sample(100).tolist()) == EXTREME_IDS
    got = buf.update(ids[::2], np.ones(len(ids[::2])), 4)
    assert got.graduated.tolist() == EXTREME_IDS[::2]
    assert buf.ids().tolist() == EXTREME_IDS[1::2]
    assert np.uint64(INT64_MAX - 1) in buf and INT64_MAX not in buf and 2**63 not in buf


def test_threshold_is_a_setting():
    buf = PromptReplayBuffer(10, threshold=0.25)
    got = buf.update([1, 2, 3], [0.0, 0.25, 0.125], 0)
    assert got.admitted.tolist() == [1, 3]
    assert buf.update([1, 3], [0.25, 0.2], 1).graduated.tolist() == [1]


# --- sampling -----------------------------------------------------------------------------


def chi_square_critical(df, z=3.09):
    """Upper 0.1% point of chi-square(df), Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("live,k", [(50, 5), (40, 30), (7, 1)])
def test_sampling_is_uniform(live, k):
    buf = PromptReplayBuffer(100, seed=1)
    buf.update(np.arange(2 * live), np.zeros(2 * live), 0)
    buf.update(np.arange(0, 2 * live, 2), np.ones(live), 1)  # graduate every other: half the window holes
    ids = buf.ids()
    assert len(ids) == live
    draws = 20_000
    counts = dict.fromkeys(ids.tolist(), 0)
    for _ in range(draws):
        s = buf.sample(k)
        assert len(s) == k and len(set(s.tolist())) == k
        for q in s.tolist():
            counts[q] += 1
    expected = draws * k / live
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < chi_square_critical(live - 1), chi2


def test_sample_all_when_fewer_and_deterministic():
    buf = PromptReplayBuffer(10, seed=7)
    assert buf.sample(3).tolist() == []
    buf.update([4, 5, 6], [0.0, 0.0, 0.0], 0)
    assert sorted(buf.sample(10).tolist()) == [4, 5, 6]
    a, b = PromptReplayBuffer(10, seed=7), PromptReplayBuffer(10, seed=7)
    for buf_ in (a, b):
        buf_.update(np.arange(10), np.zeros(10), 0)
    assert [a.sample(4).tolist() for _ in range(5)] == [b.sample(4).tolist() for _ in range(5)]
    c = PromptReplayBuffer(10, seed=8)
    c.update(np.arange(10), np.zeros(10), 0)
    assert [a.sample(4).tolist() for _ in range(5)] != [c.sample(4).tolist() for _ in range(5)]


# --- checkpoint / resume --------------------------------------------------------------------


def filled_buffer():
    buf = PromptReplayBuffer(8, seed=3)
    buf.update(np.arange(12), np.linspace(0, 0.45, 12), 0)
    buf.update([5, 6, 7, 100], [0.9, 0.1, 0.3, 0.0], 1)
    buf.sample(3)
    return buf


def test_state_dict_round_trip_is_exact():
    buf = filled_buffer()
    state = buf.state_dict()
    restored = PromptReplayBuffer(8, seed=999)
    restored.load_state_dict(state)
    assert state_equal(restored.state_dict(), state)
    assert [restored.sample(3).tolist() for _ in range(4)] == [buf.sample(3).tolist() for _ in range(4)]
    got = [b.update([6, 7, 200], [0.0, 0.7, 0.1], 2) for b in (buf, restored)]
    assert all(np.array_equal(getattr(got[0], f), getattr(got[1], f)) for f in ("admitted", "graduated", "evicted"))
    assert np.array_equal(buf.history(), restored.history())


def test_state_dict_survives_json():
    buf = filled_buffer()
    state = buf.state_dict()
    as_json = json.loads(json.dumps(state, default=lambda a: a.tolist()))
    restored = PromptReplayBuffer(8)
    restored.load_state_dict(as_json)
    assert state_equal(restored.state_dict(), state)


# --- bad input: a clear exception and the buffer unchanged -----------------------------------


@pytest.mark.parametrize("capacity,err", [(0, ValueError), (-3, ValueError), (2.5, TypeError), ("8", TypeError)])
def test_bad_capacity(capacity, err):
    with pytest.raises(err, match="capacity"):
        PromptReplayBuffer(capacity)


@pytest.mark.parametrize(
    "ids,accs,step,err,match",
    [
        ([1, 2], [0.1], 0, ValueError, "question_ids has 2 entries but accuracies has 1"),
        ([1, 2], [0.1, float("nan")], 0, ValueError, r"accuracies\[1\] = nan \(question id 2\)"),
        ([1, 2], [0.1, 1.5], 0, ValueError, r"accuracies\[1\]"),
        ([1.0, 2.0], [0.1, 0.2], 0, TypeError, "question_ids must hold integers"),
        (["a", "b"], [0.1, 0.2], 0, TypeError, "question_ids must hold integers"),
        ([2**64 - 1], [0.1], 0, ValueError, "question_ids has id"),
        ([3, 3], [0.1, 0.2], 0, ValueError, "duplicate id 3"),
        ([[1, 2]], [[0.1, 0.2]], 0, ValueError, "question_ids must be 1-D"),
        ([1], ["x"], 0, TypeError, "accuracies must hold numbers"),
        ([1], [0.1], 1.5, TypeError, "step"),
    ],
)
def test_bad_update_raises_and_leaves_buffer_unchanged(ids, accs, step, err, match):
    buf = filled_buffer()
    before = buf.state_dict()
    with pytest.raises(err, match=match):
        buf.update(np.array(ids, dtype=np.uint64) if ids == [2**64 - 1] else ids, accs, step)
    assert state_equal(buf.state_dict(), before)


def corrupt(state, path, value):
    node = state
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return state


@pytest.mark.parametrize(
    "path,value,match",
    [
        (("capacity",), 16, "capacity 16"),
        (("threshold",), 0.4, "threshold"),
        (("format",), "other/1", "format"),
        (("live",), KeyError, "missing 'live'"),
        (("live", "visits"), KeyError, "missing 'visits'"),
        (("live", "qid"), np.arange(3), "different lengths"),
        (("live", "qid"), np.array([1.5] * 8), "dtype"),
        (("live", "acc_admitted"), np.full(8, np.nan), "outside"),
        (("live", "qid"), np.zeros(8, dtype=np.int64), "duplicate"),
        (("history", "graduated"), np.zeros(5, dtype=np.int64), "dtype"),
        (("sampler",), {"key": 1, "calls": -1}, "sampler"),
        (("sampler",), {"key": "x", "calls": 0}, "sampler"),
    ],
)
def test_bad_state_dict_raises_and_leaves_buffer_unchanged(path, value, match):
    buf = filled_buffer()
    before = buf.state_dict()
    with pytest.raises((ValueError, TypeError), match=match):
        buf.load_state_dict(corrupt(buf.state_dict(), path, value))
    assert state_equal(buf.state_dict(), before)


def test_state_with_more_entries_than_capacity_is_rejected():
    big = PromptReplayBuffer(8)
    big.update(np.arange(8), np.zeros(8), 0)
    state = big.state_dict()
    for field in state["live"]:
        state["live"][field] = np.concatenate([state["live"][field], state["live"][field][:1]])
    state["live"]["qid"][-1] = 99
    small = filled_buffer()
    before = small.state_dict()
    with pytest.raises(ValueError, match="more than capacity 8"):
        small.load_state_dict(state)
    assert state_equal(small.state_dict(), before)


# --- concurrency: the raw ring's lock-free admission path -----------------------------------


def test_concurrent_admission_accounts_for_every_id():
    """4 threads admit disjoint id ranges (1,000,000 in all, batch calls) while another samples."""
    capacity, per_thread, batch = 10_000, 250_000, 2_500
    ring = _replay.Ring(capacity)
    evicted = [[] for _ in range(4)]
    stop = threading.Event()
    sampled = []

    def admitter(t):
        for start in range(t * per_thread, (t + 1) * per_thread, batch):
            ids = np.arange(start, start + batch, dtype=np.int64)
            evicted[t].append(ring.admit(ids, np.full(batch, 0.25), t)["qid"])

    def sampler():
        while not stop.is_set():
            s = ring.sample(96)
            assert len(set(s.tolist())) == len(s)
            sampled.append(s)

    threads = [threading.Thread(target=admitter, args=(t,)) for t in range(4)]
    watcher = threading.Thread(target=sampler)
    watcher.start()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    stop.set()
    watcher.join()

    live = ring.records()["qid"]
    gone = np.concatenate([a for per in evicted for a in per])
    assert len(live) == len(ring) == capacity
    everything = np.concatenate([live, gone])
    assert len(everything) == 4 * per_thread
    assert np.array_equal(np.sort(everything), np.arange(4 * per_thread))  # each id exactly once
    for t in range(4):  # FIFO: each thread's survivors are its newest ids
        mine = np.sort(live[(live >= t * per_thread) & (live < (t + 1) * per_thread)])
        assert np.array_equal(mine, np.arange((t + 1) * per_thread - len(mine), (t + 1) * per_thread))
    assert sampled and all(((s >= 0) & (s < 4 * per_thread)).all() for s in sampled)

    # The step owner then graduates half of the live entries; the rest keep their order, and
    # every id is still live, graduated or evicted exactly once.
    grads = live[::2]
    admitted, graduated, ev = ring.step(grads, np.ones(len(grads)), 9, 0.5)
    assert len(admitted) == 0 and len(ev["qid"]) == 0 and np.array_equal(graduated["qid"], grads)
    assert graduated["graduated"].all() and (graduated["exit_step"] == 9).all()
    assert np.array_equal(ring.records()["qid"], live[1::2])
    accounted = np.concatenate([ring.records()["qid"], graduated["qid"], gone])
    assert np.array_equal(np.sort(accounted), np.arange(4 * per_thread))


def test_history_dtype_fields():
    buf = filled_buffer()
    h = buf.history()
    assert h.dtype == HISTORY_DTYPE
    assert h["qid"].tolist() == [0, 1, 2, 3, 5]
    assert h["graduated"].tolist() == [False, False, False, False, True]
    assert h[-1].tolist() == (5, 0, np.linspace(0, 0.45, 12)[5], 1, True, 1, 0.9)


# --- concurrency: PromptReplayBuffer shared between threads ---------------------------------


def test_buffer_shared_by_threads_accounts_for_every_id():
    """4 threads update() disjoint id ranges (1,000,000 in all) while a fifth samples, asks len()
    and `in`: no call raises, samples are distinct live-looking ids, and every id ends up exactly
    once live, graduated or evicted. Without the buffer's lock and retries the ring refuses the
    overlapping calls (RuntimeError), so this fails."""
    capacity, per_thread, batch = 10_000, 250_000, 2_500
    buf = PromptReplayBuffer(capacity, seed=3)
    returned = [[] for _ in range(4)]  # (graduated, evicted) id arrays each update() reported
    errors = []
    stop = threading.Event()
    seen = {"samples": 0, "contains_true": 0}

    def updater(t):
        try:
            previous = np.empty(0, np.int64)
            for start in range(t * per_thread, (t + 1) * per_thread, batch):
                fresh = np.arange(start, start + batch, dtype=np.int64)
                # half of the previous batch solved (graduates, if not evicted meanwhile), the new batch hard
                solved = previous[: batch // 2]
                ids = np.concatenate([solved, fresh])
                accs = np.concatenate([np.ones(len(solved)), np.full(batch, 0.25)])
                u = buf.update(ids, accs, start // batch)
                assert np.isin(u.admitted, fresh).all() and np.isin(u.graduated, solved).all()
                returned[t].append((u.graduated, u.evicted))
                previous = fresh
        except Exception as e:  # noqa: BLE001 -- reported by the main thread
            errors.append(e)

    def watcher():
        rng = np.random.default_rng(0)
        try:
            while not stop.is_set():
                # 96 keeps the GIL in the ring; 2048 releases it, so updates meet samples in flight
                s = buf.sample(96 if seen["samples"] % 2 else 2048)
                assert len(np.unique(s)) == len(s) and ((s >= 0) & (s < 4 * per_thread)).all()
                assert 0 <= len(buf) <= capacity
                seen["contains_true"] += int(rng.integers(4 * per_thread)) in buf
                seen["samples"] += 1
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=updater, args=(t,)) for t in range(4)]
    sampler = threading.Thread(target=watcher)
    sampler.start()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    stop.set()
    sampler.join()
    assert not errors, errors
    assert seen["samples"] > 0

    live, history = buf.ids(), buf.history()
    assert len(live) == len(buf) == capacity
    everything = np.concatenate([live, history["qid"]])
    assert np.array_equal(np.sort(everything), np.arange(4 * per_thread))  # each id exactly once
    graduated = np.concatenate([g for per in returned for g, _ in per])
    evicted = np.concatenate([e for per in returned for _, e in per])
    assert np.array_equal(np.sort(graduated), np.sort(history["qid"][history["graduated"]]))
    assert np.array_equal(np.sort(evicted), np.sort(history["qid"][~history["graduated"]]))
    assert len(graduated) > 0 and len(evicted) > 0
