// One parallel region for a whole fused decode step, the way llama.cpp keeps its threads for a graph: every
// product of the step is split over the same threads, handed out through two atomics instead of a new OpenMP
// region each (at::parallel_for measured ~4 us a region over the ideal, 2 threads; a step has ~10 of them
// against ~0.3 ms of work on benchmarks/configs/b.json).
//
// with_team(body) runs body on this thread while the others wait for work (spinning, then yielding the core: relax);
// inside it, woq::parallel_for gives each thread one contiguous share of the range and returns when all are done.
// Outside with_team (or with one thread) woq::parallel_for is at::parallel_for.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <x86intrin.h>
#include <omp.h>

#include <atomic>
#include <exception>
#include <thread>
#include <vector>

namespace woq {

// One turn of a wait that began at TSC `since`: pause, and after ~100K ticks (~30-50 us) give the core away at
// each turn, so that on a machine with more busy threads than cores the thread waited for gets to run.
inline void relax(uint64_t since) {
  if (__rdtsc() - since < 100000) {
    _mm_pause();
  } else {
    std::this_thread::yield();
  }
}

inline std::atomic<int64_t> shares_handed{0};  // shares the workers took, all teams (tests: the team is used)

struct Team {
  int n = 1;  // threads, set by thread 0 before the first job
  void (*fn)(const void*, int64_t, int64_t) = nullptr;
  const void* ctx = nullptr;
  int64_t begin = 0, end = 0;
  int chunks = 1;
  alignas(64) std::atomic<uint32_t> epoch{0};  // a new job each time it moves
  alignas(64) std::atomic<int> pending{0};     // workers still on the current job
  alignas(64) std::atomic<bool> stop{false};

  void share(int i, int64_t* b0, int64_t* b1) const {
    *b0 = begin + (end - begin) * i / chunks;
    *b1 = begin + (end - begin) * (i + 1) / chunks;
  }

  // a worker (tid >= 1): each job's share tid, until stop
  void serve(int tid) {
    uint32_t seen = 0;
    for (;;) {
      uint32_t e;
      for (const uint64_t t0 = __rdtsc(); (e = epoch.load(std::memory_order_acquire)) == seen;) {
        if (stop.load(std::memory_order_acquire)) return;
        relax(t0);
      }
      seen = e;
      if (tid < chunks) {
        int64_t b0, b1;
        share(tid, &b0, &b1);
        fn(ctx, b0, b1);  // kernel loops: no exceptions (their checks run before the split)
      }
      pending.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  template <typename F>
  void run(int64_t b, int64_t e, int64_t grain, const F& f) {
    grain = std::max<int64_t>(1, grain / 4);  // a share costs ~0.2 us here, not a region's ~4: smaller ones pay
    const int64_t range = e - b;
    const int64_t c = std::min<int64_t>(n, (range + grain - 1) / std::max<int64_t>(1, grain));
    if (c <= 1) {
      if (range > 0) f(b, e);
      return;
    }
    fn = [](const void* p, int64_t b0, int64_t b1) { (*static_cast<const F*>(p))(b0, b1); };
    ctx = &f;
    begin = b, end = e, chunks = int(c);
    shares_handed.fetch_add(c - 1, std::memory_order_relaxed);
    pending.store(n - 1, std::memory_order_relaxed);
    epoch.fetch_add(1, std::memory_order_release);
    int64_t b0, b1;
    share(0, &b0, &b1);
    try {
      f(b0, b1);
    } catch (...) {  // the workers still run f's other shares: wait for them before f goes out of scope
      wait();
      throw;
    }
    wait();
  }

  void wait() {
    for (const uint64_t t0 = __rdtsc(); pending.load(std::memory_order_acquire) != 0;) relax(t0);
  }
};

inline thread_local Team* current_team = nullptr;

// The tensors a fused decode step makes, kept from step to step: the i-th tensor a step asks for (its products'
// outputs, attention's, the router's, its own intermediates) is the i-th of the step before, where that one has
// the same shape and dtype and nobody else holds it or a view of it. Its values are the last step's: callers write
// every element, as after at::empty. An at::empty costs ~0.5 us here (glibc's aligned malloc and a TensorImpl) and
// a step made ~80. Outside a step (arena null) scratch_tensor is at::empty.
struct Arena {
  std::vector<at::Tensor> pool;
  size_t next = 0;
};
inline thread_local Arena* arena = nullptr;

inline at::Tensor scratch_tensor(at::IntArrayRef shape, const at::TensorOptions& opts) {
  Arena* a = arena;
  if (a == nullptr) return at::empty(shape, opts);
  const size_t i = a->next++;
  if (i < a->pool.size()) {
    const at::Tensor& t = a->pool[i];
    if (t.use_count() == 1 && t.storage().use_count() == 1 && t.sizes() == shape && t.dtype() == opts.dtype() &&
        t.device() == opts.device())  // nobody holds it, nor a view of it
      return t;
  }
  at::Tensor t = at::empty(shape, opts);
  if (i < a->pool.size()) {
    a->pool[i] = t;
  } else {
    a->pool.push_back(t);
  }
  return t;
}

// The arena for this thread's tensors while it lives (one step); none again after.
struct ArenaScope {
  Arena* prev;
  ArenaScope(Arena* a) : prev(arena) {
    arena = a;
    if (a) a->next = 0;
  }
  ~ArenaScope() { arena = prev; }
};

// f(b0, b1) over [begin, end) in shares of at least `grain`: over the team inside with_team, else torch's pool.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (Team* t = current_team) return t->run(begin, end, grain, f);
  at::parallel_for(begin, end, grain, f);
}

// body() with this thread's team of at::get_num_threads() threads; just body() where that is one or where this
// already runs inside a parallel region.
template <typename Body>
auto with_team(Body body) -> decltype(body()) {
  const int nt = at::get_num_threads();
  if (nt <= 1 || omp_in_parallel() || current_team) return body();
  Team team;
  decltype(body()) out;
  std::exception_ptr err;
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    if (tid == 0) {
      team.n = omp_get_num_threads();
      current_team = &team;
      try {
        out = body();
      } catch (...) {
        err = std::current_exception();
      }
      current_team = nullptr;
      team.stop.store(true, std::memory_order_release);
    } else {
      team.serve(tid);
    }
  }
  if (err) std::rethrow_exception(err);
  return out;
}

}  // namespace woq
