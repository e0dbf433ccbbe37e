// replay_bench.hpp — pure C++ timing loops for the replay ring, exposed through the module
// (zppo_fast._replay.bench) so bench/bench_replay.py reports C++ and Python numbers side by
// side from one run.
#pragma once

#include <chrono>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "exit_log.hpp"
#include "replay_ring.hpp"

namespace zppo {

// Entries per second for `op` over about n entries, spread over `threads` threads:
//   admit       fresh ids through the lock-free admit() into a full ring (each also evicts)
//   step_admit  fresh ids through step() batches into a full ring (owner: 1 thread)
//   graduate    step() calls that graduate a full ring's worth of entries (owner: 1 thread)
//   graduate_random  step() calls that graduate kBatch live entries drawn at random from the
//              full ring, each followed (untimed) by kBatch fresh admissions (owner: 1 thread)
// step_admit and graduate run step() with the UpdateSink that PromptReplayBuffer.update()
// uses: the same id outputs and life records (an ExitLog), just no Python around it.
//   sample      sample(96) calls on a full ring (96 = 0.25 * 384, the paper's replay count)
inline double bench_replay(const std::string& op, std::size_t capacity, std::size_t n, std::size_t threads) {
  using Clock = std::chrono::steady_clock;
  constexpr std::size_t kBatch = 1024;
  constexpr std::size_t kSample = 96;
  if (threads == 0) throw std::invalid_argument("threads must be positive");
  ReplayRing ring(capacity);
  std::vector<double> low(capacity, 0.0);
  std::vector<std::int64_t> ids(capacity), fill_out(2 * capacity);
  ExitLog log;
  auto fill = [&](std::int64_t first) {  // untimed, through the same sink as the timed steps
    for (std::size_t i = 0; i < capacity; ++i) ids[i] = first + static_cast<std::int64_t>(i);
    UpdateSink sink{fill_out.data(), &log};
    ring.step(ids.data(), low.data(), capacity, 0, 0.5, sink);
  };

  if ((op == "graduate" || op == "graduate_random" || op == "step_admit") && threads != 1)
    throw std::invalid_argument(op + " runs on the step owner only: threads must be 1");
  if (op == "step_admit") {
    fill(-static_cast<std::int64_t>(capacity));
    std::vector<std::int64_t> batch(kBatch), out(2 * kBatch);
    std::vector<double> accs(kBatch, 0.0);
    const auto t0 = Clock::now();
    for (std::size_t done = 0; done < n; done += kBatch) {
      for (std::size_t i = 0; i < kBatch; ++i) batch[i] = static_cast<std::int64_t>(done + i);
      UpdateSink sink{out.data(), &log};
      ring.step(batch.data(), accs.data(), kBatch, 1, 0.5, sink);
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    return static_cast<double>((n + kBatch - 1) / kBatch * kBatch) / seconds;
  }
  if (op == "graduate") {
    std::vector<double> high(capacity, 1.0);
    std::vector<std::int64_t> out(2 * capacity);
    double seconds = 0;
    std::size_t done = 0;
    for (std::int64_t round = 0; done < n; ++round) {
      fill(round * static_cast<std::int64_t>(capacity));
      const auto t0 = Clock::now();
      UpdateSink sink{out.data(), &log};
      ring.step(ids.data(), high.data(), capacity, 1, 0.5, sink);
      seconds += std::chrono::duration<double>(Clock::now() - t0).count();
      done += capacity;
    }
    return static_cast<double>(done) / seconds;
  }
  if (op == "graduate_random") {
    if (capacity < kBatch) throw std::invalid_argument("graduate_random needs capacity >= " + std::to_string(kBatch));
    fill(0);
    std::vector<std::int64_t> live(ids), batch(kBatch), out(2 * kBatch);
    std::vector<double> high(kBatch, 1.0), zeros(kBatch, 0.0);
    std::mt19937_64 rng(0);
    std::int64_t next = static_cast<std::int64_t>(capacity);
    double seconds = 0;
    std::size_t done = 0;
    for (std::int64_t step = 1; done < n; step += 2, done += kBatch) {
      // kBatch distinct live ids (a partial shuffle of `live`), replaced there by fresh ones
      for (std::size_t i = 0; i < kBatch; ++i) std::swap(live[i], live[i + rng() % (capacity - i)]);
      std::copy(live.begin(), live.begin() + kBatch, batch.begin());
      const auto t0 = Clock::now();
      UpdateSink sink{out.data(), &log};
      ring.step(batch.data(), high.data(), kBatch, step, 0.5, sink);
      seconds += std::chrono::duration<double>(Clock::now() - t0).count();
      for (std::size_t i = 0; i < kBatch; ++i) live[i] = batch[i] = next++;
      UpdateSink refill{out.data(), &log};
      ring.step(batch.data(), zeros.data(), kBatch, step + 1, 0.5, refill);
    }
    return static_cast<double>(done) / seconds;
  }

  fill(-static_cast<std::int64_t>(capacity));  // start full so admissions also evict
  const std::size_t per_thread = n / threads;
  auto work = [&](std::size_t t) {
    if (op == "admit") {
      std::vector<std::int64_t> batch(kBatch);
      std::vector<double> accs(kBatch, 0.0);
      std::vector<Exit> evicted;
      evicted.reserve(kBatch);
      for (std::size_t done = 0; done < per_thread; done += kBatch) {
        for (std::size_t i = 0; i < kBatch; ++i)
          batch[i] = static_cast<std::int64_t>(t * per_thread + done + i);
        evicted.clear();
        ring.admit(batch.data(), accs.data(), kBatch, 1, &evicted);
      }
    } else {
      std::vector<std::int64_t> out(kSample);
      for (std::size_t done = 0; done < per_thread; done += kSample)
        ring.sample(kSample, out.data());
    }
  };
  if (op != "admit" && op != "sample") throw std::invalid_argument("unknown op '" + op + "'");
  const auto t0 = Clock::now();
  std::vector<std::thread> pool;
  for (std::size_t t = 0; t < threads; ++t) pool.emplace_back(work, t);
  for (auto& th : pool) th.join();
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  const std::size_t unit = op == "admit" ? kBatch : kSample;
  return static_cast<double>(threads * ((per_thread + unit - 1) / unit) * unit) / seconds;
}

}  // namespace zppo
