// cadenza's handoff worker: a CPU thread that runs a layer's CPU job when a CUDA stream asks for it by writing one
// word of mapped pinned memory, and answers in the same word (cadenza.moe.offload.streamed, cadenza.kernels.handoff).
//
// The protocol, one word per worker (`state`, host memory the GPU reaches through its mapping):
//
//   0                 idle (as allocated)
//   s + 1             request: run job s (the stream's cuStreamWriteValue32, after the job's inputs are staged)
//   (s + 1) | DONE    job s has run and its result is in host memory (the worker's release store)
//
// The stream writes `s + 1`, then waits (cuStreamWaitValue32, EQ) for `(s + 1) | DONE`. Both values are fixed per
// job, so a CUDA graph replays them unchanged, and nothing ever resets the word:
// - the stream's own request overwrites the previous answer before its wait starts (same stream, in order: a read
//   does not pass an earlier posted write), so a stale DONE of the same job cannot satisfy the wait;
// - the worker writes DONE only after the request it answers, and the stream writes the next request only after it
//   has seen that DONE, so the worker never overwrites a request it has not served;
// - the worker acts only on a request value (nonzero, DONE clear), so it never runs a job twice for one request.
// One request is in flight per worker at a time: the layers of a step run in turn (each joins before the next), and
// each Orchestra has its own worker. The stream's write carries a memory fence (the default flags; the v2 driver API
// has no other kind), so the staged inputs are visible before the request; on the host side x86 stores are ordered,
// the job's OpenMP region ends with a barrier, and an sfence orders any non-temporal stores before DONE.
//
// Idle policy: decode layers arrive every ~0.1-1 ms and steps follow each other within a few ms, so the worker spins
// (a pause per poll, ~50 ns) for `spin_ns` after its last job; then it naps `nap_ns` between polls (a request after
// a pause waits at most one nap), and after `deep_after_ns` of idleness `deep_nap_ns` (an idle server costs almost
// nothing). Jobs are `void fn(void*)`, the signature cuLaunchHostFunc calls, so the same job runs either way.
//
// Plain C ABI through ctypes; no torch headers, no AVX-512 (builds and runs on any Linux).

#include <time.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <thread>

#if defined(__linux__)
#include <pthread.h>
#include <sys/prctl.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace {

constexpr uint32_t DONE = 0x80000000u;
constexpr int MAX_SLOTS = 1 << 14;  // jobs per worker: layers x (tokens, dtype) shapes of decode steps

using Fn = void (*)(void*);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

inline void store_fence() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_sfence();  // non-temporal stores of the result land before DONE
#endif
  std::atomic_thread_fence(std::memory_order_release);
}

int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

void nap(int64_t ns) {
  timespec ts{time_t(ns / 1000000000), long(ns % 1000000000)};
  nanosleep(&ts, nullptr);
}

struct Slot {
  Fn fn;
  void* arg;
};

struct Worker {
  uint32_t* state;
  int64_t spin_ns, nap_ns, deep_after_ns, deep_nap_ns;
  Slot slots[MAX_SLOTS];
  std::atomic<int> nslots{0};  // slots [0, nslots) are published (release by add, acquire by the worker)
  std::mutex add_lock;
  std::atomic<bool> stop{false};
  // counts for tests and the bench: jobs run, requests for a slot that does not exist, naps, jobs that threw
  std::atomic<int64_t> runs{0}, unknown{0}, naps{0}, errors{0};
  std::thread thread;

  void serve(uint32_t v) {
    const uint32_t s = v - 1;
    if (s < uint32_t(nslots.load(std::memory_order_acquire))) {
      try {
        slots[s].fn(slots[s].arg);
      } catch (...) {  // (the jobs report failures in their stats; whatever happens, the stream gets its answer)
        errors.fetch_add(1, std::memory_order_relaxed);
      }
      runs.fetch_add(1, std::memory_order_relaxed);
    } else {
      unknown.fetch_add(1, std::memory_order_relaxed);  // answered anyway: a stream must never wait forever
    }
    store_fence();
    __atomic_store_n(state, v | DONE, __ATOMIC_RELEASE);
  }

  void loop() {
#if defined(__linux__)
    prctl(PR_SET_TIMERSLACK, 1000UL);  // naps of ~nap_ns, not nap_ns + the default 50 us of slack
    pthread_setname_np(pthread_self(), "cadenza-handoff");
#endif
    int64_t last = now_ns();
    for (;;) {
      // poll a while between clock reads (a read costs about as much as a few polls)
      for (int i = 0; i < 256; ++i) {
        const uint32_t v = __atomic_load_n(state, __ATOMIC_ACQUIRE);
        if (v != 0 && !(v & DONE)) {
          serve(v);
          i = 0;
          last = now_ns();
          continue;
        }
        cpu_relax();
      }
      if (stop.load(std::memory_order_acquire)) return;  // (after the poll: a pending request is served first)
      const int64_t idle = now_ns() - last;
      if (idle >= spin_ns) {
        nap(idle < deep_after_ns ? nap_ns : deep_nap_ns);
        naps.fetch_add(1, std::memory_order_relaxed);
      }
    }
  }
};

}  // namespace

extern "C" {

// Starts a worker polling *state (which must stay valid until cadenza_handoff_stop returns). Times in ns.
void* cadenza_handoff_start(uint32_t* state, int64_t spin_ns, int64_t nap_ns, int64_t deep_after_ns,
                            int64_t deep_nap_ns) {
  if (state == nullptr) return nullptr;
  Worker* w = new Worker();
  w->state = state;
  w->spin_ns = std::max<int64_t>(spin_ns, 0);
  w->nap_ns = std::max<int64_t>(nap_ns, 1000);
  w->deep_after_ns = std::max(deep_after_ns, w->spin_ns);
  w->deep_nap_ns = std::max(deep_nap_ns, w->nap_ns);
  try {
    w->thread = std::thread([w] { w->loop(); });
  } catch (...) {
    delete w;
    return nullptr;
  }
  return w;
}

// Registers fn(arg) as the next job; returns its slot s (a stream asks for it by writing s + 1), or -1 when full.
int cadenza_handoff_add(void* p, void (*fn)(void*), void* arg) {
  Worker* w = static_cast<Worker*>(p);
  if (fn == nullptr) return -1;
  std::lock_guard<std::mutex> guard(w->add_lock);
  const int s = w->nslots.load(std::memory_order_relaxed);
  if (s >= MAX_SLOTS) return -1;
  w->slots[s] = Slot{fn, arg};
  w->nslots.store(s + 1, std::memory_order_release);
  return s;
}

// Stops the worker and frees it. A request already written is served first; the caller makes sure no stream can
// still write one (it synchronises the device before).
void cadenza_handoff_stop(void* p) {
  Worker* w = static_cast<Worker*>(p);
  if (w == nullptr) return;
  w->stop.store(true, std::memory_order_release);
  if (w->thread.joinable()) w->thread.join();
  delete w;
}

// out[0..3] = jobs run, requests for unknown slots, naps taken, jobs that threw.
void cadenza_handoff_counts(void* p, int64_t* out) {
  Worker* w = static_cast<Worker*>(p);
  out[0] = w->runs.load(std::memory_order_relaxed);
  out[1] = w->unknown.load(std::memory_order_relaxed);
  out[2] = w->naps.load(std::memory_order_relaxed);
  out[3] = w->errors.load(std::memory_order_relaxed);
}

// A job that does nothing: the protocol's own cost (the bench) and the device probe's round trip.
void cadenza_handoff_noop(void*) {}

}  // extern "C"
