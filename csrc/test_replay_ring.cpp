// test_replay_ring.cpp — C++ tests of the replay ring, run by ctest and, built with
// ThreadSanitizer / AddressSanitizer, by the sanitizer targets (see CMakeLists.txt).
// No framework: each CHECK prints the failing expression and exits non-zero.
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <limits>
#include <random>
#include <set>
#include <stdexcept>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "exit_log.hpp"
#include "flat_index.hpp"
#include "replay_ring.hpp"

#define CHECK(cond)                                                                \
  do {                                                                             \
    if (!(cond)) {                                                                 \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)

using zppo::EntryState;
using zppo::Exit;
using zppo::FlatIndex;
using zppo::Record;
using zppo::ReplayRing;

namespace {

// The rules written as plainly as possible: a deque of records, oldest first.
struct ModelBuffer {
  std::size_t capacity;
  std::deque<Record> live;
  std::vector<Exit> exits;

  void step(const std::vector<std::int64_t>& qids, const std::vector<double>& accs, std::int64_t step) {
    for (std::size_t i = 0; i < qids.size(); ++i) {
      auto it = std::find_if(live.begin(), live.end(), [&](const Record& r) { return r.qid == qids[i]; });
      if (it != live.end()) {
        it->visits += 1;
        it->last_acc = accs[i];
        if (accs[i] >= 0.5) {
          Record r = *it;
          r.state = EntryState::kGraduated;
          exits.push_back(Exit{r, step});
          live.erase(it);
        }
      }
    }
    for (std::size_t i = 0; i < qids.size(); ++i) {
      const bool present =
          std::any_of(live.begin(), live.end(), [&](const Record& r) { return r.qid == qids[i]; });
      if (!present && accs[i] < 0.5)
        live.push_back(Record{qids[i], step, accs[i], accs[i], 0, EntryState::kLive});
    }
    while (live.size() > capacity) {
      Record r = live.front();
      r.state = EntryState::kEvicted;
      exits.push_back(Exit{r, step});
      live.pop_front();
    }
  }
};

bool same(const Record& a, const Record& b) {
  return a.qid == b.qid && a.step_admitted == b.step_admitted && a.acc_admitted == b.acc_admitted &&
         a.last_acc == b.last_acc && a.visits == b.visits;
}

void test_flat_index() {
  std::mt19937_64 rng(1);
  FlatIndex idx(4);
  std::unordered_map<std::int64_t, std::uint32_t> ref;
  for (int op = 0; op < 200000; ++op) {
    const std::int64_t key = static_cast<std::int64_t>(rng() % 512) - 256 +
                             (rng() % 2 ? std::numeric_limits<std::int64_t>::min() + 256 : 0);
    const int kind = static_cast<int>(rng() % 3);
    if (kind == 0) {
      idx.insert_or_assign(key, static_cast<std::uint32_t>(op));
      ref[key] = static_cast<std::uint32_t>(op);
    } else if (kind == 1) {
      CHECK(idx.erase(key) == (ref.erase(key) == 1));
    } else {
      std::uint32_t v = 0;
      const bool found = idx.find(key, v);
      CHECK(found == (ref.count(key) == 1));
      if (found) CHECK(v == ref[key]);
    }
    CHECK(idx.size() == ref.size());
  }
}

void test_step_matches_model(std::size_t capacity, int steps, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  ReplayRing ring(capacity);
  ModelBuffer model{capacity, {}, {}};
  std::vector<Exit> ring_exits;
  const std::int64_t universe = static_cast<std::int64_t>(capacity) * 3 + 5;
  for (int s = 0; s < steps; ++s) {
    std::vector<std::int64_t> pool(static_cast<std::size_t>(universe));
    for (std::int64_t i = 0; i < universe; ++i) pool[static_cast<std::size_t>(i)] = i * 7919 - 40000;
    std::shuffle(pool.begin(), pool.end(), rng);
    pool.resize(rng() % static_cast<std::uint64_t>(universe));
    std::vector<double> accs;
    for (std::size_t i = 0; i < pool.size(); ++i) accs.push_back(static_cast<double>(rng() % 9) / 8.0);
    auto res = ring.step(pool.data(), accs.data(), pool.size(), s, 0.5);
    model.step(pool, accs, s);
    ring_exits.insert(ring_exits.end(), res.graduated.begin(), res.graduated.end());
    ring_exits.insert(ring_exits.end(), res.evicted.begin(), res.evicted.end());

    const auto recs = ring.records();
    CHECK(recs.size() == model.live.size());
    CHECK(ring.size() == model.live.size());
    for (std::size_t i = 0; i < recs.size(); ++i) CHECK(same(recs[i], model.live[i]));
    CHECK(ring_exits.size() == model.exits.size());
    for (std::size_t i = 0; i < ring_exits.size(); ++i) {
      CHECK(same(ring_exits[i].record, model.exits[i].record));
      CHECK(ring_exits[i].record.state == model.exits[i].record.state);
      CHECK(ring_exits[i].exit_step == model.exits[i].exit_step);
    }
    for (const auto& r : model.live) CHECK(ring.contains(r.qid));
  }
}

void test_sample_basics() {
  ReplayRing ring(100);
  std::int64_t out[200];
  CHECK(ring.sample(5, out) == 0);
  std::vector<std::int64_t> ids;
  std::vector<double> accs;
  for (std::int64_t i = 0; i < 60; ++i) {
    ids.push_back(std::numeric_limits<std::int64_t>::max() - i);
    accs.push_back(0.0);
  }
  ring.step(ids.data(), accs.data(), ids.size(), 0, 0.5);
  for (std::size_t k : {1, 10, 29, 30, 59, 60, 61, 200}) {
    const std::size_t got = ring.sample(k, out);
    CHECK(got == std::min<std::size_t>(k, 60));
    std::set<std::int64_t> seen(out, out + got);
    CHECK(seen.size() == got);
    for (std::int64_t q : seen) CHECK(ring.contains(q));
  }
}

// Owner calls interleaved with concurrent-path admissions: the owner's index catches up
// with what admit() added and forgets what admit() evicted (its rebuild included).
void test_owner_index_follows_admit() {
  constexpr std::size_t kCapacity = 8;
  ReplayRing ring(kCapacity);
  std::vector<Exit> evicted;
  std::int64_t next = 0;
  for (int round = 0; round < 400; ++round) {
    std::vector<std::int64_t> ids;
    for (int i = 0; i < 5; ++i) ids.push_back(next++);
    std::vector<double> accs(ids.size(), 0.0);
    evicted.clear();
    ring.admit(ids.data(), accs.data(), ids.size(), round, &evicted);
    // Looking up an evicted id drops it from the index, so only some rounds do, letting
    // stale ids pile up until the index rebuilds itself.
    if (round % 50 == 0)
      for (const Exit& e : evicted) CHECK(!ring.contains(e.record.qid));
    const auto live = ring.records();
    CHECK(live.size() == std::min<std::size_t>(kCapacity, static_cast<std::size_t>(next)));
    for (std::size_t i = 0; i < live.size(); ++i) {
      CHECK(live[i].qid == next - static_cast<std::int64_t>(live.size() - i));
      CHECK(ring.contains(live[i].qid));
    }
    if (round % 7 == 0) {  // the owner graduates the oldest live entry through step()
      const std::int64_t q = live.front().qid;
      const double one = 1.0;
      CHECK(ring.step(&q, &one, 1, round, 0.5).graduated.size() == 1);
      CHECK(!ring.contains(q));
    }
  }
}

void test_gate() {
  zppo::AccessGate gate;
  {
    zppo::AccessGate::Shared a(gate);
    zppo::AccessGate::Shared b(gate);
    bool threw = false;
    try {
      zppo::AccessGate::Exclusive e(gate);
    } catch (const std::logic_error&) {
      threw = true;
    }
    CHECK(threw);
  }
  zppo::AccessGate::Exclusive e(gate);
  bool threw = false;
  try {
    zppo::AccessGate::Shared s(gate);
  } catch (const std::logic_error&) {
    threw = true;
  }
  CHECK(threw);
}

// Admits ids first, ..., first + count - 1 through the concurrent path, in batches of 1 to 64.
void admit_in_batches(ReplayRing& ring, std::int64_t first, std::int64_t count, std::mt19937_64& rng,
                      std::int64_t step, std::vector<Exit>* evicted) {
  std::vector<std::int64_t> batch;
  std::vector<double> accs;
  for (std::int64_t done = 0; done < count;) {
    const std::int64_t n = std::min<std::int64_t>(1 + static_cast<std::int64_t>(rng() % 64), count - done);
    batch.clear();
    for (std::int64_t i = 0; i < n; ++i) batch.push_back(first + done + i);
    accs.assign(batch.size(), 0.25);
    ring.admit(batch.data(), accs.data(), batch.size(), step, evicted);
    done += n;
  }
}

// 4 admitters on disjoint id ranges plus a sampler, 1,000,000 admissions in total; then
// every id must be live or evicted exactly once, and each thread's survivors must be the
// newest of its own ids (FIFO by ticket).
void test_concurrent_stress(std::size_t capacity) {
  constexpr int kThreads = 4;
  constexpr std::int64_t kPerThread = 250000;
  ReplayRing ring(capacity);
  std::vector<std::vector<Exit>> evicted(kThreads);
  std::atomic<bool> done{false};
  std::atomic<std::int64_t> samples_checked{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < kThreads; ++t) {
    pool.emplace_back([&, t] {
      std::mt19937_64 rng(static_cast<std::uint64_t>(t));
      admit_in_batches(ring, t * kPerThread, kPerThread, rng, t, &evicted[t]);
    });
  }
  std::thread sampler([&] {
    std::vector<std::int64_t> out(64);
    for (std::uint64_t seed = 0; !done.load(std::memory_order_acquire); ++seed) {
      const std::size_t got = ring.sample(1 + seed % 64, out.data());
      std::set<std::int64_t> seen(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(got));
      CHECK(seen.size() == got);
      for (std::int64_t q : seen) CHECK(q >= 0 && q < kThreads * kPerThread);
      samples_checked.fetch_add(1, std::memory_order_relaxed);
    }
  });
  for (auto& th : pool) th.join();
  done.store(true, std::memory_order_release);
  sampler.join();
  CHECK(samples_checked.load() > 0);

  const std::int64_t total = kThreads * kPerThread;
  std::vector<int> seen(static_cast<std::size_t>(total), 0);
  std::size_t n_evicted = 0;
  for (const auto& ev : evicted)
    for (const Exit& e : ev) {
      CHECK(e.record.state == EntryState::kEvicted);
      seen[static_cast<std::size_t>(e.record.qid)] += 1;
      ++n_evicted;
    }
  const auto live = ring.records();
  CHECK(live.size() == capacity);
  CHECK(ring.size() == capacity);
  CHECK(n_evicted == static_cast<std::size_t>(total) - capacity);
  std::vector<std::int64_t> lowest_live(kThreads, kPerThread);
  std::vector<std::int64_t> live_per_thread(kThreads, 0);
  for (const Record& r : live) {
    seen[static_cast<std::size_t>(r.qid)] += 1;
    const auto t = static_cast<std::size_t>(r.qid / kPerThread);
    lowest_live[t] = std::min(lowest_live[t], r.qid % kPerThread);
    live_per_thread[t] += 1;
  }
  for (int c : seen) CHECK(c == 1);  // nothing lost, nothing duplicated
  for (int t = 0; t < kThreads; ++t) CHECK(lowest_live[t] + live_per_thread[t] == kPerThread);

  // The owner graduates every other live id; the ring stays consistent and keeps order.
  std::vector<std::int64_t> ids;
  std::vector<double> accs;
  for (std::size_t i = 0; i < live.size(); i += 2) {
    ids.push_back(live[i].qid);
    accs.push_back(1.0);
  }
  auto res = ring.step(ids.data(), accs.data(), ids.size(), 99, 0.5);
  CHECK(res.graduated.size() == ids.size());
  const auto after = ring.records();
  CHECK(after.size() == live.size() - ids.size());
  for (std::size_t i = 0; i < after.size(); ++i) CHECK(after[i].qid == live[2 * i + 1].qid);
  // Every id is now live, graduated or evicted, exactly once.
  std::vector<int> again(static_cast<std::size_t>(total), 0);
  for (const auto& ev : evicted)
    for (const Exit& e : ev) again[static_cast<std::size_t>(e.record.qid)] += 1;
  for (const Exit& e : res.graduated) {
    CHECK(e.record.state == EntryState::kGraduated && e.exit_step == 99);
    again[static_cast<std::size_t>(e.record.qid)] += 1;
  }
  for (const Record& r : after) again[static_cast<std::size_t>(r.qid)] += 1;
  for (int c : again) CHECK(c == 1);
}

// Graduation holes under concurrent admitters and samplers: owner steps graduate a random
// third of the live entries (leaving holes, compacted once more than max_holes() gather), then
// 4 threads admit fresh ids while another samples. No sample is ever a graduated id, the
// holes stay within bounds, and every id ends up exactly once: live, graduated or evicted.
// `per_round` admissions per thread per round: few leave holes to gather, many sweep them out.
void test_holes_with_concurrent_admitters(std::size_t capacity, std::int64_t per_round, int rounds) {
  constexpr int kThreads = 4;
  const std::int64_t kPerRound = per_round;
  ReplayRing ring(capacity);
  std::size_t most_holes = 0;
  std::mt19937_64 rng(capacity);
  std::vector<std::vector<Exit>> evicted(kThreads);
  std::vector<Exit> graduated;
  std::unordered_set<std::int64_t> graduated_ids;
  std::int64_t next_id = 0;
  for (int round = 0; round < rounds; ++round) {
    std::vector<std::int64_t> ids;
    for (const Record& r : ring.records())
      if (rng() % 3 == 0) ids.push_back(r.qid);
    std::vector<double> ones(ids.size(), 1.0);
    auto res = ring.step(ids.data(), ones.data(), ids.size(), round, 0.5);
    CHECK(res.graduated.size() == ids.size() && res.admitted.empty() && res.evicted.empty());
    CHECK(ring.window() - ring.size() <= ring.max_holes());
    most_holes = std::max(most_holes, ring.window() - ring.size());
    for (const Exit& e : res.graduated) {
      graduated.push_back(e);
      graduated_ids.insert(e.record.qid);
    }
    std::atomic<bool> done{false};
    std::vector<std::thread> pool;
    const std::int64_t base = next_id;
    for (int t = 0; t < kThreads; ++t) {
      pool.emplace_back([&, t] {
        std::mt19937_64 local(static_cast<std::uint64_t>(round * kThreads + t));
        admit_in_batches(ring, base + t * kPerRound, kPerRound, local, round, &evicted[t]);
      });
    }
    std::thread sampler([&] {
      std::vector<std::int64_t> out(64);
      for (std::uint64_t c = 0; !done.load(std::memory_order_acquire); ++c) {
        const std::size_t got = ring.sample(1 + c % 64, out.data());
        for (std::size_t i = 0; i < got; ++i) {
          CHECK(out[i] >= 0 && out[i] < base + kThreads * kPerRound);
          CHECK(graduated_ids.count(out[i]) == 0);  // holes are never sampled
        }
      }
    });
    for (auto& th : pool) th.join();
    done.store(true, std::memory_order_release);
    sampler.join();
    next_id = base + kThreads * kPerRound;
  }
  std::vector<int> seen(static_cast<std::size_t>(next_id), 0);
  for (const Exit& e : graduated) seen[static_cast<std::size_t>(e.record.qid)] += 1;
  for (const auto& ev : evicted)
    for (const Exit& e : ev) {
      CHECK(e.record.state == EntryState::kEvicted && graduated_ids.count(e.record.qid) == 0);
      seen[static_cast<std::size_t>(e.record.qid)] += 1;
    }
  const auto live = ring.records();
  CHECK(live.size() == ring.size() && live.size() <= capacity);
  for (const Record& r : live) seen[static_cast<std::size_t>(r.qid)] += 1;
  for (int c : seen) CHECK(c == 1);  // nothing lost, nothing duplicated, no hole evicted
  CHECK(most_holes > 0);
  ring.compact_holes();
  CHECK(ring.window() == ring.size() && ring.records().size() == live.size());
}

// The exit log keeps every row, in order, across small and huge-page chunks.
void test_exit_log() {
  zppo::ExitLog log;
  const std::size_t n = 400000;  // > one 8 MiB big chunk of 48-byte rows
  log.reserve(1000);
  for (std::size_t i = 0; i < n; ++i)
    log.append(zppo::ExitRow{static_cast<std::int64_t>(i), -1, 0.25, 7, 0.5, static_cast<std::int32_t>(i % 5),
                             static_cast<std::uint8_t>(i % 2), {0, 0, 0}});
  CHECK(log.size() == n);
  std::size_t i = 0;
  log.for_each([&](const zppo::ExitRow& r) {
    CHECK(r.qid == static_cast<std::int64_t>(i) && r.visits == static_cast<std::int32_t>(i % 5) &&
          r.graduated == i % 2);
    ++i;
  });
  CHECK(i == n);
  zppo::ExitLog moved(std::move(log));
  CHECK(moved.size() == n && log.size() == 0);
}

// prefault() between appends, across small and huge-page chunks, never changes a written row
// or the size, and leaves the log appending as before.
void test_exit_log_prefault() {
  zppo::ExitLog log;
  std::mt19937_64 rng(3);
  auto row = [](std::size_t i) {
    return zppo::ExitRow{static_cast<std::int64_t>(i) * 7 - 3, static_cast<std::int64_t>(i / 3), 0.125 * (i % 9),
                         static_cast<std::int64_t>(i / 3 + i % 4), 0.5, static_cast<std::int32_t>(i % 11),
                         static_cast<std::uint8_t>(i % 2), {0, 0, 0}};
  };
  std::size_t n = 0;
  for (int round = 0; round < 300; ++round) {
    log.prefault(rng() % 4000);
    CHECK(log.size() == n);
    const std::size_t k = rng() % 3000;
    for (std::size_t j = 0; j < k; ++j, ++n) log.append(row(n));
  }
  log.prefault(0);
  std::size_t i = 0;
  log.for_each([&](const zppo::ExitRow& r) {
    const zppo::ExitRow want = row(i++);
    CHECK(r.qid == want.qid && r.step_admitted == want.step_admitted && r.acc_admitted == want.acc_admitted &&
          r.exit_step == want.exit_step && r.last_acc == want.last_acc && r.visits == want.visits &&
          r.graduated == want.graduated);
  });
  CHECK(i == n && n > 262144);  // past the first huge-page chunk
}

// A duplicate anywhere in a batch leaves ring and index as they were (pending buckets undone),
// and the UpdateSink path reports what the vector path reports.
void test_step_duplicate_and_sink() {
  ReplayRing ring(4);
  std::vector<std::int64_t> ids{1, 2, 3};
  std::vector<double> low{0.1, 0.2, 0.3};
  ring.step(ids.data(), low.data(), 3, 0, 0.5);
  std::vector<std::int64_t> bad{2, 10, 11, 2};
  std::vector<double> accs{0.9, 0.1, 0.7, 0.1};
  bool threw = false;
  try {
    ring.step(bad.data(), accs.data(), bad.size(), 1, 0.5);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);
  CHECK(ring.records().size() == 3 && ring.records()[1].visits == 0);
  CHECK(!ring.contains(10) && !ring.contains(11) && ring.contains(2));
  zppo::ExitLog log;
  std::vector<std::int64_t> out(2 * 4);
  zppo::UpdateSink sink{out.data(), &log};
  std::vector<std::int64_t> next{2, 10, 11, 12};
  std::vector<double> next_accs{0.9, 0.1, 0.7, 0.2};
  ring.step(next.data(), next_accs.data(), next.size(), 1, 0.5, sink);
  CHECK(sink.a == 2 && sink.g == 1 && sink.e == 0);
  CHECK(out[0] == 10 && out[1] == 12 && out[2] == 2);
  CHECK(log.size() == 1);
  CHECK(ring.contains(10) && !ring.contains(11) && ring.contains(12) && !ring.contains(2));
  std::vector<std::int64_t> more{20, 21};
  std::vector<double> more_accs{0.0, 0.0};
  ring.step(more.data(), more_accs.data(), 2, 2, 0.5, sink = zppo::UpdateSink{out.data(), &log});
  // [1, 3, 10, 12] + [20, 21]: the two oldest are evicted, oldest first.
  CHECK(sink.a == 2 && sink.e == 2 && out[2] == 1 && out[3] == 3 && log.size() == 3);
  CHECK(!ring.contains(1) && !ring.contains(3) && ring.contains(10) && ring.contains(21));
}

}  // namespace

int main() {
  test_exit_log();
  test_exit_log_prefault();
  test_step_duplicate_and_sink();
  test_flat_index();
  test_gate();
  test_sample_basics();
  test_owner_index_follows_admit();
  test_step_matches_model(1, 300, 1);
  test_step_matches_model(2, 300, 2);
  test_step_matches_model(17, 300, 3);
  test_step_matches_model(64, 100, 4);
  test_concurrent_stress(10000);
  test_concurrent_stress(200);  // claim blocks of 2 (little slack)
  test_concurrent_stress(3);
  test_holes_with_concurrent_admitters(10000, 6000, 6);  // admissions sweep the holes out
  test_holes_with_concurrent_admitters(10000, 625, 12);   // holes gather until compaction
  test_holes_with_concurrent_admitters(200, 12, 30);
  std::puts("test_replay_ring: all checks passed");
  return 0;
}
