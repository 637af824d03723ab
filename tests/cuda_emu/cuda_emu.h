// A small CPU emulation of the CUDA execution model, for testing the logic of
// the CUDA kernels on machines without a GPU.  Include it (after the torch
// headers) before the kernel source; the kernel then compiles with a host
// compiler and runs through icl_emu::launch.
//
// Every thread of a block is a fiber (ucontext) on the calling OS thread:
//   * __syncthreads / __syncwarp are real barriers; the fibers that may run
//     next are picked at random, so a missing barrier shows up as a wrong or
//     non-reproducible result;
//   * warp shuffles exchange values through a per-warp buffer between two
//     barriers of the 32 lanes (all lanes must take part: a divergent
//     shuffle deadlocks, which is reported);
//   * a barrier reached at different source lines by threads of the same
//     block / warp is reported (undefined behaviour on a GPU);
//   * dynamic shared memory starts filled with NaN bytes (reading an
//     uninitialised value poisons the result) and is followed by a guard
//     zone that is checked after every block (overflowing writes);
//   * blocks run one after another in a random order.
// What it does not model: memory ordering between blocks (nothing here
// relies on it), warp-synchronous execution without __syncwarp, timing.
#pragma once

#ifndef ICL_CUDA_EMULATION
#define ICL_CUDA_EMULATION 1
#endif

#include <ucontext.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)

namespace icl_emu {

struct Barrier {
  int arrived = 0;
  int line = -1;
  std::vector<int> waiters;
};

struct State {
  dim3 grid, block, bidx;
  std::vector<dim3> tidx;
  int nthreads = 0;
  int current = -1;
  std::vector<ucontext_t> ctx;
  std::vector<char> done;
  std::vector<char> stacks;
  size_t stack_size = 256 * 1024;
  ucontext_t sched;
  Barrier block_bar;
  std::vector<Barrier> warp_bar;
  std::vector<std::array<unsigned char, 8>> slot;
  std::vector<unsigned char> smem;
  size_t smem_bytes = 0;
  std::vector<int> ready;
  std::mt19937_64 rng{0x1c1};
  std::string error;
  std::function<void()> body;
  int64_t barriers = 0;  // statistics
};

constexpr size_t kGuardBytes = 256;
constexpr unsigned char kGuardByte = 0xA5;

inline State& state() {
  static State s;
  return s;
}

inline void seed(uint64_t s) { state().rng.seed(s); }

inline const dim3& thread_idx() { return state().tidx[state().current]; }
inline const dim3& block_idx() { return state().bidx; }
inline const dim3& block_dim() { return state().block; }
inline const dim3& grid_dim() { return state().grid; }
inline unsigned char* dynamic_smem() { return state().smem.data(); }

[[noreturn]] inline void fail(const std::string& msg) { throw std::runtime_error(msg); }

// Blocks the current fiber at b until `participants` fibers arrived there.
inline void wait_at(Barrier& b, int participants, int line, const char* what) {
  State& S = state();
  const int me = S.current;
  if (b.arrived == 0) {
    b.line = line;
  } else if (b.line != line) {
    fail(std::string(what) + " reached at different source lines (" + std::to_string(b.line) +
         " and " + std::to_string(line) + ") by threads of one group");
  }
  ++S.barriers;
  if (++b.arrived == participants) {
    b.arrived = 0;
    for (int w : b.waiters) S.ready.push_back(w);
    b.waiters.clear();
    S.ready.push_back(me);  // yield anyway: any released thread may go first
  } else {
    b.waiters.push_back(me);
  }
  swapcontext(&S.ctx[me], &S.sched);
}

inline void syncthreads(int line) {
  State& S = state();
  wait_at(S.block_bar, S.nthreads, line, "__syncthreads");
}

inline void syncwarp(unsigned mask, int line) {
  if (mask != 0xffffffffu) fail("__syncwarp: only full masks are emulated");
  State& S = state();
  wait_at(S.warp_bar[S.current / 32], 32, line, "__syncwarp");
}

template <typename T>
T exchange(unsigned mask, T v, int src_lane, int line) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  if (mask != 0xffffffffu) fail("shuffle: only full masks are emulated");
  State& S = state();
  const int me = S.current, warp = me / 32;
  std::memcpy(S.slot[me].data(), &v, sizeof(T));
  wait_at(S.warp_bar[warp], 32, line, "shuffle");
  T r;
  std::memcpy(&r, S.slot[warp * 32 + (src_lane & 31)].data(), sizeof(T));
  wait_at(S.warp_bar[warp], 32, line, "shuffle");
  return r;
}

inline void fiber_entry() {
  State& S = state();
  const int me = S.current;
  try {
    S.body();
  } catch (const std::exception& e) {
    if (S.error.empty()) S.error = e.what();
  }
  S.done[me] = 1;
  // returning resumes uc_link, the scheduler
}

inline void run_block() {
  State& S = state();
  const int n = S.nthreads;
  for (int i = 0; i < n; ++i) {
    S.done[i] = 0;
    getcontext(&S.ctx[i]);
    S.ctx[i].uc_stack.ss_sp = S.stacks.data() + static_cast<size_t>(i) * S.stack_size;
    S.ctx[i].uc_stack.ss_size = S.stack_size;
    S.ctx[i].uc_link = &S.sched;
    makecontext(&S.ctx[i], fiber_entry, 0);
  }
  S.block_bar = Barrier{};
  for (auto& w : S.warp_bar) w = Barrier{};
  S.ready.clear();
  for (int i = 0; i < n; ++i) S.ready.push_back(i);
  while (!S.ready.empty()) {
    const size_t k = S.rng() % S.ready.size();
    const int i = S.ready[k];
    S.ready[k] = S.ready.back();
    S.ready.pop_back();
    S.current = i;
    swapcontext(&S.sched, &S.ctx[i]);
  }
  S.current = -1;
  int blocked = 0;
  for (int i = 0; i < n; ++i) blocked += !S.done[i];
  if (blocked && S.error.empty())
    S.error = "deadlock: " + std::to_string(blocked) + " of " + std::to_string(n) +
              " threads wait at a barrier that the others never reach (block barrier at line " +
              std::to_string(S.block_bar.line) + ")";
}

// Runs kernel(p) on a 1-D grid of 1-D blocks.
template <typename P>
void launch(void (*kernel)(P), int64_t grid, int threads, size_t smem_bytes, const P& p) {
  State& S = state();
  if (threads % 32 != 0 || threads <= 0 || threads > 1024) fail("emulated launch: bad block size");
  if (grid <= 0) return;
  S.grid = dim3(static_cast<unsigned>(grid));
  S.block = dim3(static_cast<unsigned>(threads));
  S.nthreads = threads;
  S.tidx.assign(threads, dim3());
  for (int i = 0; i < threads; ++i) S.tidx[i] = dim3(static_cast<unsigned>(i));
  S.ctx.resize(threads);
  S.done.assign(threads, 0);
  if (S.stacks.size() < static_cast<size_t>(threads) * S.stack_size)
    S.stacks.resize(static_cast<size_t>(threads) * S.stack_size);
  S.warp_bar.assign(threads / 32, Barrier{});
  S.slot.assign(threads, {});
  S.smem_bytes = smem_bytes;
  S.smem.assign(smem_bytes + kGuardBytes, 0);
  S.error.clear();
  const P params = p;
  S.body = [&params, kernel]() { kernel(params); };
  std::vector<int64_t> order(grid);
  for (int64_t i = 0; i < grid; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), S.rng);
  for (int64_t bi : order) {
    S.bidx = dim3(static_cast<unsigned>(bi));
    std::memset(S.smem.data(), 0xFF, smem_bytes);  // NaN for float and double
    std::memset(S.smem.data() + smem_bytes, kGuardByte, kGuardBytes);
    run_block();
    if (!S.error.empty()) fail("emulated kernel, block " + std::to_string(bi) + ": " + S.error);
    for (size_t k = 0; k < kGuardBytes; ++k)
      if (S.smem[smem_bytes + k] != kGuardByte)
        fail("emulated kernel, block " + std::to_string(bi) +
             ": write past the end of dynamic shared memory");
  }
  S.body = nullptr;
}

}  // namespace icl_emu

#define threadIdx (::icl_emu::thread_idx())
#define blockIdx (::icl_emu::block_idx())
#define blockDim (::icl_emu::block_dim())
#define gridDim (::icl_emu::grid_dim())

inline void __syncthreads(int line = __builtin_LINE()) { icl_emu::syncthreads(line); }
inline void __syncwarp(unsigned mask = 0xffffffffu, int line = __builtin_LINE()) {
  icl_emu::syncwarp(mask, line);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                         int line = __builtin_LINE()) {
  if (width != 32) icl_emu::fail("shuffle: only width 32 is emulated");
  return icl_emu::exchange(mask, v, static_cast<int>(threadIdx.x % 32) ^ lane_mask, line);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32,
                     int line = __builtin_LINE()) {
  if (width != 32) icl_emu::fail("shuffle: only width 32 is emulated");
  return icl_emu::exchange(mask, v, src_lane, line);
}
