// exit_log.hpp — the replay buffer's life records: one fixed-size row per exit (graduation or
// eviction), appended by the step owner in exit order and never moved.
// Header-only, C++17, torch-free.
//
// Why its own arena: the log only grows (one row per exit, forever), so every row lands in
// memory the process has never touched. A growing std::vector or numpy array pays that
// first touch plus a copy of everything at each doubling. Here rows go into chunks that are
// never reallocated; chunks double in size up to kBigChunkBytes, and the big ones are 2 MiB
// aligned and marked MADV_HUGEPAGE (Linux), so the kernel backs them with transparent huge
// pages: one fault per 2 MiB instead of one per 4 KiB. Where THP is off the chunks simply
// get ordinary pages.
//
// Why prefault(): even with huge pages, the kernel zeroing fresh memory cost as much as the
// rest of a graduation (and up to 4x more on a VM whose host backs guest memory lazily). The
// replay buffer keeps room faulted in for every live entry's exit record (UpdateSink::end),
// so that cost is paid when an entry is admitted, like the allocation of its record in any
// other store, and a step's exits write to memory that is already there. Rows faulted in but
// not yet written are at most the buffer's capacity.
//
// Invariants:
//   L1  Rows [0, size()) are chunk 0's rows, then chunk 1's, ...; every chunk but the last is
//       full, and cur_ points at the last chunk's first unused row (or is null when none).
//   L2  A row's bytes never move once written (no reallocation), so appending never copies.
//   L3  runs_ is sorted by first row, runs_[0].first == 0 when size() > 0, and row r's exit
//       step and flag are those of the last run with first <= r. far_ is sorted by row and
//       holds exactly the rows whose admitted_ago is kFarAdmitted.
//   L4  After reserve(n), the next n appends allocate nothing (cannot throw), provided they
//       open at most kRunsPerReserve new runs.
//   L5  Rows [0, faulted_) lie in allocated chunks whose pages have been written to.
#pragma once

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <type_traits>
#include <vector>

#include "replay_ring.hpp"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace zppo {

// One exit as the Python history sees it (the logical row; 49 bytes packed there, visits
// widened to int64). The log stores each as a 32-byte PackedExit plus shared run records.
struct ExitRow {
  std::int64_t qid;
  std::int64_t step_admitted;
  double acc_admitted;
  std::int64_t exit_step;
  double last_acc;
  std::int32_t visits;
  std::uint8_t graduated;  // 1: graduated, 0: evicted
  std::uint8_t pad_[3];
};
static_assert(sizeof(ExitRow) == 48, "life record layout");
static_assert(std::is_trivially_copyable_v<ExitRow>, "rows are plain bytes");

// What the log stores per exit: every fresh byte costs a kernel page zeroing, so exit_step and
// graduated live once per run of rows that share them (a step's graduations, then its
// evictions), and step_admitted as a 32-bit distance back from exit_step, with the rare row
// whose distance does not fit kept exactly in a side table (kFarAdmitted).
struct PackedExit {
  std::int64_t qid;
  double acc_admitted;
  double last_acc;
  std::int32_t visits;
  std::int32_t admitted_ago;  // exit_step - step_admitted (mod 2**64), or kFarAdmitted
};
static_assert(sizeof(PackedExit) == 32, "two rows per cache line");
static_assert(std::is_trivially_copyable_v<PackedExit>, "rows are plain bytes");

class ExitLog {
 public:
  static constexpr std::size_t kFirstChunkRows = 256;
  static constexpr std::size_t kHugePage = std::size_t{2} << 20;
  static constexpr std::size_t kBigChunkBytes = 4 * kHugePage;
  static constexpr std::int32_t kFarAdmitted = INT32_MIN;
  static constexpr std::size_t kRunsPerReserve = 2;  // one step: its graduations, its evictions

  ExitLog() = default;
  ExitLog(const ExitLog&) = delete;
  ExitLog& operator=(const ExitLog&) = delete;
  ExitLog(ExitLog&& o) noexcept { *this = std::move(o); }
  ExitLog& operator=(ExitLog&& o) noexcept {
    if (this != &o) {
      release();
      chunks_.swap(o.chunks_);
      current_chunk_ = o.current_chunk_;
      cur_ = o.cur_;
      end_ = o.end_;
      size_ = o.size_;
      faulted_ = o.faulted_;
      runs_.swap(o.runs_);
      far_.swap(o.far_);
      o.cur_ = o.end_ = nullptr;
      o.size_ = o.faulted_ = 0;
    }
    return *this;
  }
  ~ExitLog() { release(); }

  std::size_t size() const { return size_; }

  // Appends one row (L1-L3). Throws std::bad_alloc (log unchanged) if memory runs out,
  // never after a reserve() that covers it (L4).
  void append(const ExitRow& row) {
    if (cur_ == end_) add_chunk();
    const std::uint64_t ago = static_cast<std::uint64_t>(row.exit_step) - static_cast<std::uint64_t>(row.step_admitted);
    const auto ago_signed = static_cast<std::int64_t>(ago);
    const bool near = ago_signed > kFarAdmitted && ago_signed <= INT32_MAX;
    const bool new_run = runs_.empty() || runs_.back().exit_step != row.exit_step ||
                         runs_.back().graduated != row.graduated;
    if (new_run) runs_.push_back(Run{size_, row.exit_step, row.graduated});  // no-op on throw
    if (!near) {
      try {
        far_.push_back(Far{size_, row.step_admitted});
      } catch (...) {
        if (new_run) runs_.pop_back();
        throw;
      }
    }
    *cur_++ = PackedExit{row.qid, row.acc_admitted, row.last_acc, row.visits,
                         near ? static_cast<std::int32_t>(ago_signed) : kFarAdmitted};
    ++size_;
  }

  // Makes room for `n` more rows (allocating now), so that the next n appends cannot throw (L4).
  void reserve(std::size_t n) {
    std::size_t spare = static_cast<std::size_t>(end_ - cur_);
    for (std::size_t i = cur_ == nullptr ? 0 : current_chunk_ + 1; i < chunks_.size(); ++i) spare += chunks_[i].rows;
    while (spare < n) {
      chunks_.push_back(allocate(next_rows()));
      spare += chunks_.back().rows;
    }
    grow_to(runs_, runs_.size() + kRunsPerReserve);
    grow_to(far_, far_.size() + n);  // address space only until a far row appears
  }

  // Writes to every page of rows [size(), size() + n) now, allocating chunks as needed (L5), so
  // the appends that fill them never wait on the kernel. Best effort: out of memory, it stops
  // (append() and reserve() still allocate what they need).
  void prefault(std::size_t n) noexcept {
    const std::size_t from = std::max(faulted_, size_);  // never touch a written row
    const std::size_t want = size_ + n;
    if (from >= want) return;
    try {
      reserve(n);
    } catch (const std::bad_alloc&) {
      return;
    }
    std::size_t first = 0;  // row number of the chunk's first row (L1)
    for (const Chunk& c : chunks_) {
      const std::size_t end = first + c.rows;
      if (end > from) {
        // One write per page: with huge pages the first one faults in all 2 MiB.
        const auto lo = reinterpret_cast<std::uintptr_t>(c.data + (std::max(first, from) - first));
        const auto hi = reinterpret_cast<std::uintptr_t>(c.data + (std::min(end, want) - first));
        for (std::uintptr_t a = lo; a < hi; a = (a & ~std::uintptr_t{4095}) + 4096)
          *reinterpret_cast<volatile unsigned char*>(a) = 0;
        if (end >= want) break;
      }
      first = end;
    }
    faulted_ = want;
  }

  // Calls fn(const ExitRow&) for every row, oldest first.
  template <typename Fn>
  void for_each(Fn&& fn) const {
    std::size_t left = size_, row = 0, run = 0, far = 0;
    for (const Chunk& c : chunks_) {
      const std::size_t k = std::min(left, c.rows);
      for (std::size_t i = 0; i < k; ++i, ++row) {
        while (run + 1 < runs_.size() && runs_[run + 1].first <= row) ++run;
        const PackedExit& p = c.data[i];
        std::int64_t admitted;
        if (p.admitted_ago == kFarAdmitted) {
          admitted = far_[far++].step_admitted;
        } else {
          admitted = static_cast<std::int64_t>(static_cast<std::uint64_t>(runs_[run].exit_step) -
                                               static_cast<std::uint64_t>(static_cast<std::int64_t>(p.admitted_ago)));
        }
        fn(ExitRow{p.qid, admitted, p.acc_admitted, runs_[run].exit_step, p.last_acc, p.visits, runs_[run].graduated,
                   {0, 0, 0}});
      }
      left -= k;
      if (left == 0) break;
    }
  }

  void clear() { release(); }

 private:
  struct Run {
    std::size_t first;  // its first row
    std::int64_t exit_step;
    std::uint8_t graduated;
  };
  struct Far {
    std::size_t row;
    std::int64_t step_admitted;
  };

  template <typename T>
  static void grow_to(std::vector<T>& v, std::size_t n) {
    if (v.capacity() < n) v.reserve(std::max(n, 2 * v.capacity()));
  }

  struct Chunk {
    PackedExit* data;
    std::size_t rows;
    std::size_t mapped_bytes;  // > 0: an mmap'ed big chunk of this many bytes; 0: operator new
  };

  std::size_t next_rows() const {
    if (chunks_.empty()) return kFirstChunkRows;
    const std::size_t last = chunks_.back().rows;
    return std::min(2 * last, kBigChunkBytes / sizeof(PackedExit));
  }

  // Moves cur_ to the next chunk, allocating it if reserve() has not already.
  void add_chunk() {
    const std::size_t next = cur_ == nullptr ? 0 : current_chunk_ + 1;
    if (next == chunks_.size()) chunks_.push_back(allocate(next_rows()));  // may throw: log unchanged
    current_chunk_ = next;
    cur_ = chunks_[next].data;
    end_ = cur_ + chunks_[next].rows;
  }

  static Chunk allocate(std::size_t rows) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (rows * sizeof(PackedExit) >= kHugePage) {
      // Whole huge pages, 2 MiB aligned: over-map by one huge page and trim both ends.
      const std::size_t bytes = (rows * sizeof(PackedExit) + kHugePage - 1) & ~(kHugePage - 1);
      const std::size_t span = bytes + kHugePage;
      void* p = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) throw std::bad_alloc();
      const auto base = reinterpret_cast<std::uintptr_t>(p);
      const std::uintptr_t start = (base + kHugePage - 1) & ~(std::uintptr_t{kHugePage} - 1);
      if (start != base) munmap(p, start - base);
      if (base + span != start + bytes) munmap(reinterpret_cast<void*>(start + bytes), base + span - (start + bytes));
      madvise(reinterpret_cast<void*>(start), bytes, MADV_HUGEPAGE);  // advice only: may fail
      return Chunk{reinterpret_cast<PackedExit*>(start), bytes / sizeof(PackedExit), bytes};
    }
#endif
    return Chunk{static_cast<PackedExit*>(::operator new(rows * sizeof(PackedExit))), rows, 0};
  }

  void release() {
    for (const Chunk& c : chunks_) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      if (c.mapped_bytes) {
        munmap(c.data, c.mapped_bytes);
        continue;
      }
#endif
      ::operator delete(c.data);
    }
    chunks_.clear();
    runs_.clear();
    far_.clear();
    cur_ = end_ = nullptr;
    current_chunk_ = 0;
    size_ = faulted_ = 0;
  }

  std::vector<Chunk> chunks_;
  std::size_t current_chunk_ = 0;
  std::vector<Run> runs_;
  std::vector<Far> far_;
  PackedExit* cur_ = nullptr;
  PackedExit* end_ = nullptr;
  std::size_t size_ = 0;
  std::size_t faulted_ = 0;
};

// ReplayRing::step() sink for the buffer's update: ids go straight into one caller-provided
// int64 buffer laid out as [admitted | graduated | evicted] (room for 2n: a + g <= n and
// e <= a), exits straight into the log (no intermediate vectors, no conversion pass).
struct UpdateSink {
  std::int64_t* out;
  ExitLog* log;
  std::size_t a = 0, g = 0, e = 0;  // counts, known from begin()
  std::int64_t* next_admitted = nullptr;
  std::int64_t* next_graduated = nullptr;
  std::int64_t* next_evicted = nullptr;

  void begin(std::size_t na, std::size_t ng, std::size_t ne) {
    log->reserve(ng + ne);  // the only allocation; may throw before the ring changes
    a = na;
    g = ng;
    e = ne;
    next_admitted = out;
    next_graduated = out + na;
    next_evicted = out + na + ng;
  }
  void admitted(std::int64_t qid) { *next_admitted++ = qid; }
  void graduated(const Record& r, std::int64_t step) {
    *next_graduated++ = r.qid;
    log_exit(r, step, true);
  }
  void evicted(const Record& r, std::int64_t step) {
    *next_evicted++ = r.qid;
    log_exit(r, step, false);
  }
  // Room for every live entry's exit record, faulted in now (see ExitLog::prefault).
  void end(std::size_t live) { log->prefault(live); }
  void log_exit(const Record& r, std::int64_t step, bool grad) {
    log->append(ExitRow{r.qid, r.step_admitted, r.acc_admitted, step, r.last_acc, r.visits,
                        static_cast<std::uint8_t>(grad), {0, 0, 0}});
  }
};

}  // namespace zppo
