// flat_index.hpp — a compact open-addressing map from question id (any int64) to a 32-bit
// value (the ring's slot index), used only by the ring's single step owner (never
// concurrently).
//
// Why not std::unordered_map: one node allocation per id and a pointer chase per lookup
// would dominate the per-entry cost of a replay step. Linear probing over one flat array
// with backward-shift deletion keeps lookups to one or two cache lines and leaves no
// tombstones behind, so the table never degrades however many ids pass through it.
//
// Each bucket also carries a 32-bit stamp the owner sets to the current step's epoch when a
// step touches that id. A step therefore answers "already seen in this batch?" (duplicate
// check) and "in the buffer?" (membership) with the same single probe, and the table never
// needs clearing between steps: a new epoch makes every old stamp stale at once.
//
// Invariants:
//   F1  Load factor <= 1/2: 2 * size() <= bucket_count() (reserve() grows before inserting).
//   F2  Every present key is reachable from its home bucket through occupied buckets only
//       (linear probing, no tombstones; erase() shifts later run members back).
//   F3  value == kEmpty marks an empty bucket, so every int64 is a valid key; stored values
//       are < kEmpty.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace zppo {

class FlatIndex {
 public:
  static constexpr std::uint32_t kEmpty = 0xFFFFFFFFu;

  struct Bucket {
    std::int64_t key;
    std::uint32_t value;  // kEmpty: empty bucket (F3)
    std::uint32_t stamp;  // the owner's epoch of the last step that touched this key
  };
  static_assert(sizeof(Bucket) == 16, "four buckets per cache line");

  explicit FlatIndex(std::size_t expected = 16) { reset(expected); }

  std::size_t size() const { return size_; }
  std::size_t bucket_count() const { return buckets_.size(); }

  // Empties the table and sizes it for `expected` keys (F1).
  void reset(std::size_t expected) {
    std::size_t n = 16;
    while (n < 2 * expected + 2) n <<= 1;
    buckets_.assign(n, Bucket{0, kEmpty, 0});
    set_mask(n);
    size_ = 0;
  }

  // Grows (rehashing) so that `extra` more keys keep F1; bucket references die.
  void reserve(std::size_t extra) {
    while (2 * (size_ + extra) > buckets_.size()) grow();
  }

  // The home buckets of keys[0, n), each hashed once and prefetched kAhead keys before it is
  // asked for: a batch's probes overlap their cache misses, and pay the hash once, not twice.
  // Call home(0), home(1), ... in order; valid until the table grows.
  class Lookahead {
   public:
    static constexpr std::size_t kAhead = 8;
    Lookahead(const FlatIndex& index, const std::int64_t* keys, std::size_t n) : index_(index), keys_(keys), n_(n) {
      for (std::size_t i = 0; i < n && i < kAhead; ++i) fetch(i);
    }
    std::size_t home(std::size_t i) {
      const std::size_t h = homes_[i % kAhead];
      if (i + kAhead < n_) fetch(i + kAhead);
      return h;
    }

   private:
    void fetch(std::size_t i) {
      homes_[i % kAhead] = index_.home(keys_[i]);
      index_.prefetch_at(homes_[i % kAhead]);
    }
    const FlatIndex& index_;
    const std::int64_t* keys_;
    std::size_t n_;
    std::size_t homes_[kAhead];
  };

  // Hints the cache that bucket position i (from position()) will be touched soon.
  void prefetch_at(std::size_t i) const { __builtin_prefetch(&buckets_[i & mask_], 1, 3); }

  // The bucket holding `key`, or the empty bucket ending its probe run (fill it with
  // occupy() to insert; call reserve() first). One probe run, no hashing beyond home().
  Bucket& probe(std::int64_t key) { return probe_from(home(key), key); }
  // probe() for a key whose home bucket (from a Lookahead) is `home`.
  Bucket& probe_from(std::size_t home, std::int64_t key) {
    for (std::size_t i = home;; i = (i + 1) & mask_) {
      Bucket& b = buckets_[i];
      if (b.value == kEmpty || b.key == key) return b;
    }
  }

  // Bucket positions stay valid until the next insertion that grows, or erase().
  std::size_t position(const Bucket& b) const { return static_cast<std::size_t>(&b - buckets_.data()); }
  Bucket& at(std::size_t i) { return buckets_[i]; }

  // Overwrites the value of a key known to be present (no growth, no shifting: bucket
  // positions stay valid).
  void assign_existing(std::int64_t key, std::uint32_t value) { probe(key).value = value; }

  // Fills the empty bucket that probe(key) returned.
  void occupy(Bucket& b, std::int64_t key, std::uint32_t value, std::uint32_t stamp) {
    b = Bucket{key, value, stamp};
    ++size_;
  }

  // Whether `key` is present; if so its value is written to `value`.
  bool find(std::int64_t key, std::uint32_t& value) const {
    for (std::size_t i = home(key);; i = (i + 1) & mask_) {
      const Bucket& b = buckets_[i];
      if (b.value == kEmpty) return false;
      if (b.key == key) {
        value = b.value;
        return true;
      }
    }
  }

  // Inserts key -> value unless key is present; returns whether it inserted.
  bool insert_if_absent(std::int64_t key, std::uint32_t value) {
    reserve(1);
    Bucket& b = probe(key);
    if (b.value != kEmpty) return false;
    occupy(b, key, value, 0);
    return true;
  }

  // Inserts or overwrites key's value, keeping an existing stamp.
  void insert_or_assign(std::int64_t key, std::uint32_t value) {
    reserve(1);
    Bucket& b = probe(key);
    if (b.value == kEmpty) occupy(b, key, value, 0);
    else b.value = value;
  }

  // Removes `key` if present; returns whether it was.
  bool erase(std::int64_t key) { return erase_from(home(key), key); }
  // erase() for a key whose home bucket (from a Lookahead) is `home`.
  bool erase_from(std::size_t home, std::int64_t key) {
    std::size_t i = home;
    for (;; i = (i + 1) & mask_) {
      if (buckets_[i].value == kEmpty) return false;
      if (buckets_[i].key == key) break;
    }
    erase_at(i);
    return true;
  }

  // erase(key) for a key last seen in bucket `hint`: erasures since may have shifted it
  // toward its home (never past), so check the hint before probing again.
  void erase_near(std::size_t hint, std::int64_t key) {
    if (buckets_[hint].value != kEmpty && buckets_[hint].key == key) erase_at(hint);
    else erase(key);
  }

  // Every stamp back to 0 (the owner calls this when its epoch counter wraps).
  void clear_stamps() {
    for (Bucket& b : buckets_) b.stamp = 0;
  }

 private:
  // Backward-shift deletion of the occupied bucket i: later members of the probe run move
  // up so that every key stays reachable from its home (F2).
  void erase_at(std::size_t i) {
    for (std::size_t j = (i + 1) & mask_;; j = (j + 1) & mask_) {
      if (buckets_[j].value == kEmpty) break;
      const std::size_t k = home(buckets_[j].key);
      // Move j into the hole at i unless j's home lies cyclically in (i, j].
      const bool home_between = (i <= j) ? (i < k && k <= j) : (i < k || k <= j);
      if (!home_between) {
        buckets_[i] = buckets_[j];
        i = j;
      }
    }
    buckets_[i].value = kEmpty;
    --size_;
  }

  std::size_t home(std::int64_t key) const {
    // Fibonacci hashing: one multiply, the top bits of the product. Consecutive ids (the
    // common case) land ~0.618 of the table apart, so runs stay short; high-bit-only
    // differences still reach the top bits through the multiply.
    const std::uint64_t z = static_cast<std::uint64_t>(key) * 0x9e3779b97f4a7c15ULL;
    return static_cast<std::size_t>((z ^ (z >> 29)) >> shift_) & mask_;
  }

  void set_mask(std::size_t n) {
    mask_ = n - 1;
    unsigned bits = 0;
    while ((std::size_t{1} << bits) < n) ++bits;
    shift_ = 64 - bits;
  }

  void grow() {
    std::vector<Bucket> old;
    old.swap(buckets_);
    buckets_.assign(old.size() * 2, Bucket{0, kEmpty, 0});
    set_mask(buckets_.size());
    size_ = 0;
    for (const Bucket& b : old)
      if (b.value != kEmpty) occupy(probe(b.key), b.key, b.value, b.stamp);
  }

  std::vector<Bucket> buckets_;
  std::size_t mask_ = 0;
  unsigned shift_ = 64;
  std::size_t size_ = 0;
};

}  // namespace zppo
