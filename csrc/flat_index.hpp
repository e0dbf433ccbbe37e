// flat_index.hpp — a compact open-addressing map from question id (any int64) to a ring
// ticket, used only by the ring's single step owner (never concurrently).
//
// Why not std::unordered_map: one node allocation per id and a pointer chase per lookup
// would dominate the per-entry cost of a replay step. Linear probing over one flat array
// with backward-shift deletion keeps lookups to one or two cache lines and leaves no
// tombstones behind, so the table never degrades however many ids pass through it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace zppo {

class FlatIndex {
 public:
  explicit FlatIndex(std::size_t expected = 16) { reset(expected); }

  std::size_t size() const { return size_; }

  // Empties the table and sizes it for `expected` keys (load factor <= 1/2).
  void reset(std::size_t expected) {
    std::size_t n = 16;
    while (n < 2 * expected + 2) n <<= 1;
    buckets_.assign(n, Bucket{0, 0});
    mask_ = n - 1;
    size_ = 0;
  }

  // Whether `key` is present; if so its value is written to `value`.
  bool find(std::int64_t key, std::uint64_t& value) const {
    for (std::size_t i = home(key);; i = (i + 1) & mask_) {
      const Bucket& b = buckets_[i];
      if (b.value_plus1 == 0) return false;
      if (b.key == key) {
        value = b.value_plus1 - 1;
        return true;
      }
    }
  }

  // Inserts key -> value unless key is present; returns whether it inserted. One probe run.
  bool insert_if_absent(std::int64_t key, std::uint64_t value) {
    Bucket& b = probe_for_insert(key);
    if (b.value_plus1 != 0) return false;
    b = Bucket{key, value + 1};
    ++size_;
    return true;
  }

  void insert_or_assign(std::int64_t key, std::uint64_t value) {
    Bucket& b = probe_for_insert(key);
    if (b.value_plus1 == 0) {
      b.key = key;
      ++size_;
    }
    b.value_plus1 = value + 1;
  }

  // Removes `key` if present; returns whether it was. Backward-shift deletion: later
  // members of the probe run move up so that every key stays reachable from its home.
  bool erase(std::int64_t key) {
    std::size_t i = home(key);
    for (;; i = (i + 1) & mask_) {
      if (buckets_[i].value_plus1 == 0) return false;
      if (buckets_[i].key == key) break;
    }
    for (std::size_t j = (i + 1) & mask_;; j = (j + 1) & mask_) {
      if (buckets_[j].value_plus1 == 0) break;
      const std::size_t k = home(buckets_[j].key);
      // Move j into the hole at i unless j's home lies cyclically in (i, j].
      const bool home_between = (i <= j) ? (i < k && k <= j) : (i < k || k <= j);
      if (!home_between) {
        buckets_[i] = buckets_[j];
        i = j;
      }
    }
    buckets_[i] = Bucket{0, 0};
    --size_;
    return true;
  }

 private:
  // value_plus1 == 0 marks an empty bucket, so every int64 is a valid key.
  struct Bucket {
    std::int64_t key;
    std::uint64_t value_plus1;
  };

  // The bucket holding `key`, or the empty bucket ending its probe run (after growing, so an
  // insertion there keeps the load factor <= 1/2).
  Bucket& probe_for_insert(std::int64_t key) {
    if (2 * (size_ + 1) > buckets_.size()) grow();
    for (std::size_t i = home(key);; i = (i + 1) & mask_) {
      Bucket& b = buckets_[i];
      if (b.value_plus1 == 0 || b.key == key) return b;
    }
  }

  std::size_t home(std::int64_t key) const {
    // splitmix64 finalizer: consecutive ids (the common case) spread over the table.
    std::uint64_t z = static_cast<std::uint64_t>(key) + 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return static_cast<std::size_t>(z ^ (z >> 31)) & mask_;
  }

  void grow() {
    std::vector<Bucket> old;
    old.swap(buckets_);
    buckets_.assign(old.size() * 2, Bucket{0, 0});
    mask_ = buckets_.size() - 1;
    size_ = 0;
    for (const Bucket& b : old)
      if (b.value_plus1 != 0) insert_or_assign(b.key, b.value_plus1 - 1);
  }

  std::vector<Bucket> buckets_;
  std::size_t mask_ = 0;
  std::size_t size_ = 0;
};

}  // namespace zppo
