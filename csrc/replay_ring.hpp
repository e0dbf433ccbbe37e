// replay_ring.hpp — the ZPPO prompt-replay buffer as a bounded FIFO ring of fixed-size
// question records: lock-free admission from several threads, FIFO eviction of the oldest
// entry beyond capacity, graduation (removal) and uniform sampling among live entries.
// Header-only, C++17, torch-free.
//
// Shape: a Vyukov bounded MPMC queue. Admissions claim 64-bit tickets (their positions) by
// CAS on tail_, a block of up to kClaimBlock at a time; evictions claim the oldest published
// tickets by CAS on head_, a run at a time. Each slot carries a sequence number saying which
// ticket it holds and whether it is published, so admitters, evictors and samplers agree
// without a mutex. Claiming in blocks keeps the contended atomics per admitted entry far below
// one: with one CAS per entry, 4 threads on 2 cores admitted 6x slower than 1 thread.
//
// Who may call what at the same time:
//   admit()                      any number of threads, alongside admit() and sample().
//                                The caller guarantees that the ids it admits are not live
//                                and are not being admitted by another thread (reward
//                                workers own disjoint questions); step() is the checked path.
//   sample()                     any number of threads, alongside admit() and sample().
//   step(), contains(), compact_holes(), records(), sampler_state(), load()
//                                the single step owner, with no other call in flight.
//   size(), capacity(), slot_count(), window(), max_holes()  anywhere.
// An owner call that overlaps any other call throws std::logic_error (AccessGate) instead
// of corrupting the ring.
//
// Invariants (p is a ticket; slot(p) = slots_[p & mask_]; P = slots_.size()):
//   I1  head_ <= tail_ <= head_ + P: the window [head_, tail_) fits in the slots.
//   I2  p in [head_, tail_): slot(p).seq == p + 1 once its admitter has published it,
//       <= p before (the evictor of ticket p - P may not have freed the slot yet, I3), and
//       p + 2 once it graduated: a hole, never sampled, listed or counted as an eviction.
//   I3  A slot is freed for ticket p (seq = p) by whoever evicted ticket p - P, right after
//       claiming it; p is only ever claimed once p - P < head_ (tail_ <= head_ + P, I1).
//   I4  Holes are made only by step(); evictions free holes they meet at the head, and
//       step() compacts the window (moving live entries over the holes) once more than
//       max_holes_ remain, so graduating costs O(1) amortized, not a shift of the ring.
//       After every owner call, tail_ - head_ <= capacity + max_holes_.
//   I5  Once admitters are quiescent, size() == live entries in the window <= capacity and
//       the live entries are the most recently admitted ones in ticket order (exact FIFO).
//   I6  Seq values of a slot only grow (p, p + 1 [, p + 2], p + P, p + P + 1, ...), so a
//       sampler that reads seq p + 1 before and after reading a qid has read that ticket's
//       qid, and of a live entry.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "flat_index.hpp"

namespace zppo {

enum class EntryState : std::uint32_t { kLive = 0, kGraduated = 1, kEvicted = 2 };

// One question's life in the buffer. `visits` counts the steps that evaluated it after the
// step that admitted it (the graduating step included); `last_acc` is the latest of them.
struct Record {
  std::int64_t qid;
  std::int64_t step_admitted;
  double acc_admitted;
  double last_acc;
  std::int32_t visits;
  EntryState state;
};

// A record that left the buffer, at `exit_step`; record.state says how.
struct Exit {
  Record record;
  std::int64_t exit_step;
};

struct StepResult {
  std::vector<std::int64_t> admitted;  // in the order given
  std::vector<Exit> graduated;         // in the order given
  std::vector<Exit> evicted;           // oldest first
};

// Detects an owner call overlapping any other call. Dekker-style: both sides publish their
// presence with a seq_cst RMW/store and then look for the other, so at least one of two
// overlapping calls sees the other and throws.
class AccessGate {
 public:
  class Shared {
   public:
    explicit Shared(const AccessGate& g) : g_(g) {
      g_.shared_.fetch_add(1, std::memory_order_seq_cst);
      if (g_.exclusive_.load(std::memory_order_seq_cst)) {
        g_.shared_.fetch_sub(1, std::memory_order_seq_cst);
        throw std::logic_error("replay ring: admit/sample overlapped a step-owner call");
      }
    }
    ~Shared() { g_.shared_.fetch_sub(1, std::memory_order_seq_cst); }
    Shared(const Shared&) = delete;
    Shared& operator=(const Shared&) = delete;

   private:
    const AccessGate& g_;
  };

  class Exclusive {
   public:
    explicit Exclusive(const AccessGate& g) : g_(g) {
      if (g_.exclusive_.exchange(true, std::memory_order_seq_cst))
        throw std::logic_error("replay ring: two step-owner calls overlapped");
      if (g_.shared_.load(std::memory_order_seq_cst) != 0) {
        g_.exclusive_.store(false, std::memory_order_seq_cst);
        throw std::logic_error("replay ring: a step-owner call overlapped admit/sample");
      }
    }
    ~Exclusive() { g_.exclusive_.store(false, std::memory_order_seq_cst); }
    Exclusive(const Exclusive&) = delete;
    Exclusive& operator=(const Exclusive&) = delete;

   private:
    const AccessGate& g_;
  };

 private:
  alignas(64) mutable std::atomic<std::int64_t> shared_{0};
  alignas(64) mutable std::atomic<bool> exclusive_{false};
};

// splitmix64's output function: a strong 64-bit bijective mix.
inline std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// splitmix64: tiny, seedable from one integer, good enough for choosing replayed prompts.
class SplitMix64 {
 public:
  explicit SplitMix64(std::uint64_t seed) : s_(seed) {}
  std::uint64_t next() {
    return mix64(s_ += 0x9e3779b97f4a7c15ULL);
  }
  // Uniform in [0, n), unbiased (Lemire's multiply-shift with rejection). n > 0.
  std::uint64_t below(std::uint64_t n) {
    unsigned __int128 m = static_cast<unsigned __int128>(next()) * n;
    std::uint64_t low = static_cast<std::uint64_t>(m);
    if (low < n) {
      const std::uint64_t threshold = (0 - n) % n;
      while (low < threshold) {
        m = static_cast<unsigned __int128>(next()) * n;
        low = static_cast<std::uint64_t>(m);
      }
    }
    return static_cast<std::uint64_t>(m >> 64);
  }

 private:
  std::uint64_t s_;
};

class ReplayRing {
 public:
  // Admitters beyond this many at once still work; they just spin while the slots are full.
  static constexpr std::size_t kMaxConcurrentAdmitters = 64;
  // Most tickets one admitter claims at once (fewer when the slots' slack is small).
  static constexpr std::size_t kClaimBlock = 64;

  // The sampler is counter-based: call number c of sample() draws from a splitmix stream
  // seeded with mix64(key ^ mix64(c)), so its whole state is (key, calls), concurrent
  // samplers never share a stream, and a checkpoint restores it exactly.
  struct SamplerState {
    std::uint64_t key;
    std::uint64_t calls;
  };

  explicit ReplayRing(std::size_t capacity, std::uint64_t seed = 0)
      : sampler_key_(mix64(seed)), capacity_(capacity), index_(capacity) {
    if (capacity == 0) throw std::invalid_argument("capacity must be positive, got 0");
    if (capacity > (std::size_t{1} << 30))  // slot indices must stay below kPending
      throw std::invalid_argument("capacity must be at most 2**30, got " + std::to_string(capacity));
    // I1 with room for at least capacity / 2 holes (I4) and for every in-flight admitter: per
    // admitter one claimed-but-unpublished block and one published-not-yet-evicted one.
    claim_block_ = std::clamp<std::size_t>(capacity / (2 * kMaxConcurrentAdmitters), 1, kClaimBlock);
    const std::size_t in_flight = 2 * kMaxConcurrentAdmitters * claim_block_;
    std::size_t n = 2;
    while (n < capacity + (capacity + 1) / 2 + in_flight) n <<= 1;
    slots_ = std::vector<Slot>(n);
    mask_ = n - 1;
    max_holes_ = n - capacity - in_flight;
    reset_slots();
  }

  std::size_t capacity() const { return capacity_; }
  // Upper bound on what one sample() can return, even mid-admission (I1).
  std::size_t slot_count() const { return slots_.size(); }
  // Tickets from the oldest to the newest: live entries, holes, admissions in flight (I4).
  std::size_t window() const {
    const std::uint64_t head = head_.load(std::memory_order_acquire);
    return tail_.load(std::memory_order_acquire) - head;  // tail read after head: never negative
  }
  std::size_t max_holes() const { return max_holes_; }
  // Live entries; exact once admitters are quiescent.
  std::size_t size() const { return count_.load(std::memory_order_acquire); }

  // Admits n records at the tail in the order given, evicting the oldest entries beyond
  // capacity (whoever's they are); evicted records are appended to `evicted`.
  void admit(const std::int64_t* qids, const double* accs, std::size_t n, std::int64_t step,
             std::vector<Exit>* evicted) {
    AccessGate::Shared guard(gate_);
    for (std::size_t i = 0; i < n; i += claim_block_)
      admit_block(qids + i, accs + i, std::min(n - i, claim_block_), step, evicted);
  }

  // Writes min(k, live) distinct live ids, uniformly chosen, to out (room for
  // min(k, slot_count())); returns how many.
  std::size_t sample(std::size_t k, std::int64_t* out) {
    AccessGate::Shared guard(gate_);
    const std::uint64_t call = sampler_calls_.fetch_add(1, std::memory_order_relaxed);
    SplitMix64 rng(mix64(sampler_key_ ^ mix64(call)));
    const std::uint64_t head = head_.load(std::memory_order_acquire);
    const std::uint64_t tail = tail_.load(std::memory_order_acquire);
    const std::uint64_t window = tail - head;  // tail read after head, so tail >= head
    if (k == 0 || window == 0) return 0;
    // Rejection over the window is uniform among live entries (each position is equally
    // likely, dead ones and holes are redrawn); it pays off while k is well below the live
    // count. Its budget of draws scales with window / live, the draws per live hit (holes).
    const std::size_t live_count = size();
    if (2 * k < live_count) {
      // Already-chosen positions: one bit per slot (positions in the window map to distinct
      // slots, I1). Per thread, reused, and all-zero between calls: each call clears the words
      // it touched, which is cheaper than clearing the whole map or hashing positions.
      thread_local std::vector<std::uint64_t> chosen;
      thread_local std::vector<std::uint64_t> touched;
      if (chosen.size() < slots_.size() / 64) chosen.resize(slots_.size() / 64);
      touched.reserve(k);  // may throw: before any bit is set
      touched.clear();
      std::size_t got = 0;
      const std::uint64_t budget = 4 * k * window / live_count + 64;
      for (std::uint64_t tries = 0; got < k && tries < budget; ++tries) {
        const std::uint64_t p = head + rng.below(window);
        std::uint64_t& word = chosen[(p & mask_) >> 6];
        const std::uint64_t bit = std::uint64_t{1} << (p & 63);
        std::int64_t qid;
        if ((word & bit) || !read_live_qid(p, qid)) continue;
        word |= bit;
        touched.push_back((p & mask_) >> 6);
        out[got++] = qid;
      }
      for (std::uint64_t w : touched) chosen[w] = 0;
      if (got == k) return k;
      // Too many dead draws (heavy concurrent churn): start over with the scan, which is
      // uniform on its own, so the mixture stays uniform.
    }
    std::vector<std::int64_t> live;
    live.reserve(window);
    for (std::uint64_t p = head; p != tail; ++p) {
      std::int64_t qid;
      if (read_live_qid(p, qid)) live.push_back(qid);
    }
    const std::size_t m = std::min({k, live.size(), slots_.size()});
    for (std::size_t i = 0; i < m; ++i) {  // partial Fisher-Yates
      const std::size_t j = i + static_cast<std::size_t>(rng.below(live.size() - i));
      std::swap(live[i], live[j]);
      out[i] = live[i];
    }
    return m;
  }

  // Applies one step's plain-rollout accuracies as one unit, in the paper's order: live
  // entries with acc >= threshold graduate, live ones below it get a visit, absent ones
  // below it are admitted at the tail in the order given, then the oldest entries beyond
  // capacity are evicted. Throws std::invalid_argument (ring unchanged) on duplicate ids.
  //
  // What happened goes to `sink` (see VectorSink for the shape):
  //   sink.begin(a, g, e)        once, before anything changes, with the exact numbers of
  //                              admissions, graduations and evictions to come; it may throw
  //                              (e.g. bad_alloc reserving room), leaving the ring unchanged;
  //                              the calls below must not throw.
  //   sink.graduated(rec, step)  each graduation, in the order given;
  //   sink.admitted(qid)         each admission, in the order given;
  //   sink.evicted(rec, step)    each eviction, oldest first (after all graduations);
  //   sink.end(live)             once, last, with the number of live entries now.
  //
  // Cost per entry: one index probe (hashed once, prefetched a few entries ahead) answers both the
  // duplicate check (the bucket's stamp is this step's epoch) and membership, and gives a new
  // id its bucket with its final value: admission j of this step lands at ticket tail_ + j
  // whatever graduates or is evicted (compaction moves survivors toward the tail, never past
  // it), so no later pass hashes it again, and graduates leave the index as they graduate.
  template <typename Sink>
  void step(const std::int64_t* qids, const double* accs, std::size_t n, std::int64_t step, double threshold,
            Sink& sink) {
    AccessGate::Exclusive guard(gate_);
    catch_up_index();
    // Pass 1: classify every id; the ring is not touched, the index only gains buckets for
    // new ids (undone on a duplicate) and stamps (made stale by the next epoch).
    const std::uint32_t epoch = next_epoch();
    const std::uint64_t tail = tail_.load(std::memory_order_relaxed);
    stayers_.clear();
    graduates_.clear();
    admits_.clear();
    drops_.clear();
    stayers_.reserve(n);  // may throw: before any change
    graduates_.reserve(n);
    admits_.reserve(n);
    drops_.reserve(n);
    index_.reserve(n);  // new ids' buckets below never grow the table (F1), so positions hold
    FlatIndex::Lookahead ahead(index_, qids, n);
    for (std::size_t i = 0; i < n; ++i) {
      const std::int64_t q = qids[i];
      FlatIndex::Bucket& b = index_.probe_from(ahead.home(i), q);
      std::uint64_t p;
      if (b.value == FlatIndex::kEmpty) {
        index_.occupy(b, q, kPending, epoch);
      } else if (b.stamp == epoch) {
        undo_pending(qids);
        throw std::invalid_argument("question_ids contains duplicate id " + std::to_string(q));
      } else if (live_ticket(b.value, q, p)) {
        b.stamp = epoch;
        // Field by field into reserved room: a braced temporary here made the compiler store
        // two words and reload them as one (a store-forwarding stall: ~2 of this pass's ~17 ns/entry).
        Member& m = accs[i] >= threshold ? graduates_.emplace_back() : stayers_.emplace_back();
        m.i = i;
        m.ticket = p;
        m.bucket = index_.position(b);
        continue;
      } else {  // a stale id (evicted by a concurrent admit()): reuse its bucket
        b.stamp = epoch;
      }
      if (accs[i] < threshold) {
        b.value = slot_index(tail + admits_.size());
        admits_.push_back(i);
      } else {
        b.value = kPending;
        drops_.push_back(i);
      }
    }
    const std::size_t graduations = graduates_.size();
    const std::size_t live = count_.load(std::memory_order_relaxed);
    const std::size_t after = live - graduations + admits_.size();
    const std::size_t evictions = after > capacity_ ? after - capacity_ : 0;
    try {
      evicted_.clear();
      evicted_.reserve(evictions);
      sink.begin(admits_.size(), graduations, evictions);
    } catch (...) {
      undo_pending(qids);
      throw;
    }

    // Pass 2: entries that stay get their visit; graduates get theirs, leave their exit record
    // and a hole, in the order given, and then leave the index (their buckets, scattered over
    // the table, prefetched kAhead early as in pass 1). Three loops rather than one: each
    // keeps fewer memory streams in flight (graduating a full ring: 28 -> 25 cycles/entry).
    // Nothing below throws.
    for (const Member& m : stayers_) {
      Slot& s = slot(m.ticket);
      s.visits += 1;
      s.last_acc = accs[m.i];
    }
    for (const Member& m : graduates_) {
      Slot& s = slot(m.ticket);
      s.visits += 1;
      s.last_acc = accs[m.i];
      s.state = EntryState::kGraduated;
      sink.graduated(s.record(), step);
      s.seq.store(m.ticket + 2, std::memory_order_relaxed);  // a hole (I2)
    }
    constexpr std::size_t kAhead = FlatIndex::Lookahead::kAhead;
    for (std::size_t j = 0; j < graduations; ++j) {
      if (j + kAhead < graduations) index_.prefetch_at(graduates_[j + kAhead].bucket);
      index_.erase_near(graduates_[j].bucket, qids[graduates_[j].i]);
    }
    if (graduations) {
      count_.store(live - graduations, std::memory_order_relaxed);
      // compaction moves live entries: their buckets get new values in place (I4)
      if (window() - (live - graduations) > max_holes_) compact(live - graduations);
    }
    // Pass 3: admissions at the tickets pass 1 gave their buckets; evictions pop the head.
    for (std::size_t i : admits_) {
      sink.admitted(qids[i]);
      admit_owned(qids[i], accs[i], step, sink);
    }
    // Pass 4: drop from the index what left without graduating.
    FlatIndex::Lookahead evicted_ahead(index_, evicted_.data(), evicted_.size());
    for (std::size_t j = 0; j < evicted_.size(); ++j) index_.erase_from(evicted_ahead.home(j), evicted_[j]);
    for (std::size_t i : drops_) index_.erase(qids[i]);
    indexed_upto_ = tail_.load(std::memory_order_relaxed);
    sink.end(count_.load(std::memory_order_relaxed));
  }

  // step() collecting into vectors (tests, and the raw Ring.step binding).
  struct VectorSink {
    StepResult result;
    void begin(std::size_t a, std::size_t g, std::size_t e) {
      result.admitted.reserve(a);
      result.graduated.reserve(g);
      result.evicted.reserve(e);
    }
    void admitted(std::int64_t qid) { result.admitted.push_back(qid); }
    void graduated(const Record& r, std::int64_t step) { result.graduated.push_back(Exit{r, step}); }
    void evicted(const Record& r, std::int64_t step) { result.evicted.push_back(Exit{r, step}); }
    void end(std::size_t) {}
  };

  StepResult step(const std::int64_t* qids, const double* accs, std::size_t n, std::int64_t step, double threshold) {
    VectorSink sink;
    this->step(qids, accs, n, step, threshold, sink);
    return std::move(sink.result);
  }

  bool contains(std::int64_t qid) {
    AccessGate::Exclusive guard(gate_);
    catch_up_index();
    std::uint64_t p;
    return find_live(qid, p);
  }

  // Moves live entries over every graduation hole now (I4). Then where entries sit, which is
  // what sample() draws over, follows from the live records alone: a checkpoint taken after
  // this (PromptReplayBuffer.state_dict) and a ring loaded from it draw the same samples.
  void compact_holes() {
    AccessGate::Exclusive guard(gate_);
    catch_up_index();
    const std::size_t live = count_.load(std::memory_order_relaxed);
    if (window() > live) compact(live);
  }

  // Live records, oldest first.
  std::vector<Record> records() const {
    AccessGate::Exclusive guard(gate_);
    const std::uint64_t head = head_.load(std::memory_order_relaxed);
    const std::uint64_t tail = tail_.load(std::memory_order_relaxed);
    std::vector<Record> out;
    out.reserve(tail - head);
    for (std::uint64_t p = head; p != tail; ++p)
      if (slot(p).seq.load(std::memory_order_relaxed) == p + 1) out.push_back(slot(p).record());
    return out;
  }

  SamplerState sampler_state() const {
    AccessGate::Exclusive guard(gate_);
    return SamplerState{sampler_key_, sampler_calls_.load(std::memory_order_relaxed)};
  }

  // Replaces the contents with `records` (oldest first, all live) and the sampler state.
  // Throws std::invalid_argument (ring unchanged) if they exceed capacity or repeat an id.
  void load(const std::vector<Record>& records, SamplerState sampler) {
    AccessGate::Exclusive guard(gate_);
    if (records.size() > capacity_)
      throw std::invalid_argument("state holds " + std::to_string(records.size()) +
                                  " entries, more than capacity " + std::to_string(capacity_));
    std::vector<std::int64_t> qids;
    for (const Record& r : records) qids.push_back(r.qid);
    check_distinct(qids.data(), qids.size());
    reset_slots();
    for (std::uint64_t p = 0; p < records.size(); ++p) {
      Slot& s = slot(p);
      s.set(records[p]);
      s.state = EntryState::kLive;
      s.seq.store(p + 1, std::memory_order_relaxed);
      index_.insert_or_assign(records[p].qid, slot_index(p));
    }
    tail_.store(records.size(), std::memory_order_relaxed);
    count_.store(records.size(), std::memory_order_relaxed);
    indexed_upto_ = records.size();
    sampler_key_ = sampler.key;
    sampler_calls_.store(sampler.calls, std::memory_order_relaxed);
  }

 private:
  struct alignas(64) Slot {
    std::atomic<std::uint64_t> seq{0};
    // Samplers read qid while a later admitter may rewrite the slot, so it is atomic (stored
    // with release, loaded with acquire: see read_live_qid). The other fields are only read
    // by whoever owns the ticket after an acquire of seq, so they are plain.
    std::atomic<std::int64_t> qid{0};
    std::int64_t step_admitted = 0;
    double acc_admitted = 0;
    double last_acc = 0;
    std::int32_t visits = 0;
    EntryState state = EntryState::kLive;

    Record record() const {
      return Record{qid.load(std::memory_order_relaxed), step_admitted, acc_admitted, last_acc,
                    visits, state};
    }
    void set(const Record& r) {
      qid.store(r.qid, std::memory_order_release);
      step_admitted = r.step_admitted;
      acc_admitted = r.acc_admitted;
      last_acc = r.last_acc;
      visits = r.visits;
      state = r.state;
    }
  };
  static_assert(sizeof(Slot) == 64 && alignof(Slot) == 64, "one record per cache line");
  static_assert(std::atomic<std::uint64_t>::is_always_lock_free, "seq must be lock-free");
  static_assert(std::atomic<std::int64_t>::is_always_lock_free, "qid must be lock-free");
  static_assert(std::is_trivially_copyable_v<Record>, "records are copied as plain bytes");

  Slot& slot(std::uint64_t p) { return slots_[p & mask_]; }
  const Slot& slot(std::uint64_t p) const { return slots_[p & mask_]; }

  // Claims m consecutive tickets, writes and publishes them, then evicts one oldest entry for
  // each of them that took the ring beyond capacity.
  void admit_block(const std::int64_t* qids, const double* accs, std::size_t m, std::int64_t step,
                   std::vector<Exit>* evicted) {
    std::uint64_t p = tail_.load(std::memory_order_relaxed);
    for (;;) {
      // I1: the block's last ticket must lie within P of the oldest; head_ only grows, so once
      // true this stays true until the CAS.
      if (p + m > head_.load(std::memory_order_acquire) + slots_.size()) {
        std::this_thread::yield();  // full of in-flight tickets: their evictions come shortly
        p = tail_.load(std::memory_order_relaxed);
      } else if (tail_.compare_exchange_weak(p, p + m, std::memory_order_relaxed)) {
        break;
      }
    }
    for (std::size_t k = 0; k < m; ++k) {
      Slot& s = slot(p + k);
      // The evictor of ticket p + k - P has claimed it (I3) and frees the slot right away.
      while (s.seq.load(std::memory_order_acquire) != p + k) std::this_thread::yield();
      s.set(Record{qids[k], step, accs[k], accs[k], 0, EntryState::kLive});
      s.seq.store(p + k + 1, std::memory_order_release);  // publish (I2)
    }
    // Every admission whose increment lands above capacity evicts exactly one entry, so the
    // count settles at min(admitted, capacity) and the evicted ones are the oldest tickets.
    const std::size_t before = count_.fetch_add(m, std::memory_order_acq_rel);
    const std::size_t over = before + m > capacity_ ? std::min(m, before + m - capacity_) : 0;
    for (std::size_t left = over; left > 0;) left -= evict_oldest(left, step, evicted);
    if (over) count_.fetch_sub(over, std::memory_order_acq_rel);
  }

  // admit_block for the step owner, one entry: the gate keeps everyone else out, so plain
  // loads and stores do what the CAS loops do, at a fraction of the cost.
  template <typename Sink>
  void admit_owned(std::int64_t qid, double acc, std::int64_t step, Sink& sink) {
    const std::uint64_t p = tail_.load(std::memory_order_relaxed);
    Slot& s = slot(p);
    s.set(Record{qid, step, acc, acc, 0, EntryState::kLive});
    s.seq.store(p + 1, std::memory_order_relaxed);
    tail_.store(p + 1, std::memory_order_relaxed);
    const std::size_t live = count_.load(std::memory_order_relaxed) + 1;
    if (live <= capacity_) {
      count_.store(live, std::memory_order_relaxed);
      return;
    }
    std::uint64_t h = head_.load(std::memory_order_relaxed);
    for (; slot(h).seq.load(std::memory_order_relaxed) == h + 2; ++h)  // holes at the head: free them
      slot(h).seq.store(h + slots_.size(), std::memory_order_relaxed);
    Slot& e = slot(h);
    Record r = e.record();
    r.state = EntryState::kEvicted;
    sink.evicted(r, step);
    evicted_.push_back(r.qid);  // capacity reserved by the owner (see step())
    e.seq.store(h + slots_.size(), std::memory_order_relaxed);
    head_.store(h + 1, std::memory_order_relaxed);
  }

  // Vyukov dequeue from head_, by one CAS, of the run of published tickets there that holds
  // up to `most` live entries (and the holes among them, I2). The head may belong to an
  // admitter still writing (it claimed an older ticket than ours); wait for its publish
  // rather than skip it. Returns how many live entries it evicted (0 if the run was holes).
  std::size_t evict_oldest(std::size_t most, std::int64_t step, std::vector<Exit>* evicted) {
    std::uint64_t p = head_.load(std::memory_order_relaxed);
    std::size_t run, live;
    for (;;) {  // a failed CAS leaves the current head in p: count again from there
      run = live = 0;
      for (; live < most; ++run) {
        const std::uint64_t seq = slot(p + run).seq.load(std::memory_order_acquire);
        if (seq == p + run + 1) ++live;
        else if (seq != p + run + 2) break;
      }
      if (run > 0 && head_.compare_exchange_weak(p, p + run, std::memory_order_relaxed)) break;
      if (run == 0) {
        std::this_thread::yield();
        p = head_.load(std::memory_order_relaxed);
      }
    }
    for (std::size_t k = 0; k < run; ++k) {
      Slot& s = slot(p + k);
      if (s.seq.load(std::memory_order_relaxed) == p + k + 1) {
        Record r = s.record();
        r.state = EntryState::kEvicted;
        evicted->push_back(Exit{r, step});
      }
      s.seq.store(p + k + slots_.size(), std::memory_order_release);  // free for lap p + k + P (I3)
    }
    return live;
  }

  // Reads ticket p's qid if p is published and still live; never a torn or recycled value.
  bool read_live_qid(std::uint64_t p, std::int64_t& qid) const {
    const Slot& s = slot(p);
    if (s.seq.load(std::memory_order_acquire) != p + 1) return false;
    // Acquire pairs with the admitter's release store of qid: if we read a later lap's qid,
    // the seq load below must see that lap's seq (I6) and we reject.
    qid = s.qid.load(std::memory_order_acquire);
    return s.seq.load(std::memory_order_relaxed) == p + 1;
  }

  // Owner only. Slides live entries toward the tail over the graduation holes, keeping
  // their order, and gives the freed slots to the next lap (I3, I4). O(window): step() calls
  // it once more than max_holes_ holes have gathered.
  // `survivors` is the number of live entries (count_ after the graduations): once that many
  // are placed, everything older is a hole, so the scan stops at the oldest survivor.
  void compact(std::size_t survivors) {
    const std::uint64_t head = head_.load(std::memory_order_relaxed);
    const std::uint64_t tail = tail_.load(std::memory_order_relaxed);
    std::uint64_t dst = tail;
    const std::uint64_t last = tail - survivors;  // dst once every survivor is placed
    for (std::uint64_t p = tail; dst != last && p-- > head;) {
      if (slot(p).state != EntryState::kLive) continue;
      if (--dst != p) {  // dst > p: slot(dst) was already moved or was a hole
        slot(dst).set(slot(p).record());
        slot(dst).seq.store(dst + 1, std::memory_order_relaxed);  // published, no longer a hole
        index_.assign_existing(slot(dst).qid.load(std::memory_order_relaxed), slot_index(dst));
      }
    }
    for (std::uint64_t p = head; p != dst; ++p)
      slot(p).seq.store(p + slots_.size(), std::memory_order_relaxed);
    head_.store(dst, std::memory_order_release);
  }

  // Owner only. Indexes entries that concurrent admit() calls added since the last owner
  // call; entries they evicted are left stale and dropped when looked up (find_live).
  void catch_up_index() {
    const std::uint64_t head = head_.load(std::memory_order_relaxed);
    const std::uint64_t tail = tail_.load(std::memory_order_relaxed);
    if (index_.size() > 2 * capacity_ + 1024) {  // too many stale ids: rebuild
      index_.reset(capacity_);
      indexed_upto_ = head;
    }
    for (std::uint64_t p = indexed_upto_ > head ? indexed_upto_ : head; p < tail; ++p)
      if (slot(p).seq.load(std::memory_order_relaxed) == p + 1)  // not a hole
        index_.insert_or_assign(slot(p).qid.load(std::memory_order_relaxed), slot_index(p));
    indexed_upto_ = tail;
  }

  // Owner only: the ticket of qid's live entry, if any.
  bool find_live(std::int64_t qid, std::uint64_t& p) {
    std::uint32_t s;
    if (!index_.find(qid, s)) return false;
    if (live_ticket(s, qid, p)) return true;
    index_.erase(qid);  // evicted by a concurrent admit()
    return false;
  }

  // Owner only: whether slot index s holds qid's live entry, and its ticket. The window
  // [head_, tail_) maps onto distinct slots (I1), so s names at most one ticket in it.
  bool live_ticket(std::uint32_t s, std::int64_t qid, std::uint64_t& p) const {
    const std::uint64_t head = head_.load(std::memory_order_relaxed);
    p = head + ((s - head) & mask_);
    return p < tail_.load(std::memory_order_relaxed) && slot(p).seq.load(std::memory_order_relaxed) == p + 1 &&
           slot(p).qid.load(std::memory_order_relaxed) == qid;
  }

  std::uint32_t slot_index(std::uint64_t p) const { return static_cast<std::uint32_t>(p & mask_); }

  // Owner only: a fresh epoch for bucket stamps (0 is never current, so a bucket stamped 0
  // is never mistaken for this step's).
  std::uint32_t next_epoch() {
    if (++epoch_ == 0) {
      index_.clear_stamps();
      epoch_ = 1;
    }
    return epoch_;
  }

  // Owner only: removes the buckets pass 1 of step() gave new ids (duplicate or failure).
  void undo_pending(const std::int64_t* qids) {
    for (std::size_t i : admits_) index_.erase(qids[i]);
    for (std::size_t i : drops_) index_.erase(qids[i]);
  }

  void check_distinct(const std::int64_t* qids, std::size_t n) {
    scratch_.reset(n);
    for (std::size_t i = 0; i < n; ++i)
      if (!scratch_.insert_if_absent(qids[i], i))
        throw std::invalid_argument("question_ids contains duplicate id " + std::to_string(qids[i]));
  }

  void reset_slots() {
    for (std::size_t i = 0; i < slots_.size(); ++i) slots_[i].seq.store(i, std::memory_order_relaxed);
    head_.store(0, std::memory_order_relaxed);
    tail_.store(0, std::memory_order_relaxed);
    count_.store(0, std::memory_order_relaxed);
    index_.reset(capacity_);
    indexed_upto_ = 0;
  }

  // Written by different threads: one cache line each so they do not false-share.
  alignas(64) std::atomic<std::uint64_t> head_{0};  // oldest ticket still in the ring
  alignas(64) std::atomic<std::uint64_t> tail_{0};  // next ticket to claim
  alignas(64) std::atomic<std::size_t> count_{0};   // live entries (see admit_block)
  alignas(64) std::atomic<std::uint64_t> sampler_calls_{0};
  AccessGate gate_;
  std::uint64_t sampler_key_;

  // Read-mostly or owner-only state.
  alignas(64) std::size_t capacity_;
  std::vector<Slot> slots_;
  std::uint64_t mask_ = 0;
  std::size_t claim_block_ = 1;
  std::size_t max_holes_ = 0;  // graduation holes step() leaves uncompacted (I4)
  // Owner-only step() scratch, kept between calls so a step allocates nothing once warm.
  struct Member {
    std::size_t i;        // position in the batch
    std::uint64_t ticket;
    std::size_t bucket;   // its index bucket as of pass 1 (erasures may shift it back)
  };
  // The bucket value of an id this step saw but will not admit; never a slot index.
  static constexpr std::uint32_t kPending = FlatIndex::kEmpty - 1;

  FlatIndex index_;              // qid -> slot index, owner only; may hold stale evicted ids
  FlatIndex scratch_;            // owner only: duplicate check in load()
  std::vector<Member> stayers_;              // live ids of this step below the threshold
  std::vector<Member> graduates_;            // live ids of this step at or above it, in order
  std::vector<std::size_t> admits_;         // batch positions of this step's admissions, in order
  std::vector<std::size_t> drops_;          // batch positions of ids neither live nor admitted
  std::vector<std::int64_t> evicted_;       // ids evicted by this step, to drop from the index
  std::uint64_t indexed_upto_ = 0;
  std::uint32_t epoch_ = 0;
};

}  // namespace zppo
