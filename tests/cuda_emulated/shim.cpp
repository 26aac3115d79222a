// The runtime half of cuda_shim.h: launches, __syncthreads and warp shuffles.
#include "cuda_shim.h"

#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

void shim_fail(const char* what) {
  fprintf(stderr, "cuda_emulated: %s\n", what);
  abort();
}

namespace {
constexpr unsigned kWarp = 32;

// State of the running launch, shared by its threads.
std::unique_ptr<std::barrier<>> block_barrier;             // __syncthreads
std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;  // one per warp, for shuffles
std::vector<uint32_t> shfl_slots[2];                          // one value per thread
thread_local unsigned shfl_parity = 0;
}  // namespace

void __syncthreads() { block_barrier->arrive_and_wait(); }

uint32_t shfl_xor_bits(uint32_t mask, uint32_t bits, int lane_mask) {
  if (mask != 0xffffffffu || lane_mask < 0 || lane_mask >= int(kWarp)) {
    shim_fail("only full-warp shuffles with a lane mask below 32 are emulated");
  }
  const unsigned t = threadIdx.x;
  // Two slot arrays, alternately: a lane can only write the next shuffle's value to these
  // slots again after the barrier of the shuffle in between, which every lane reaches after
  // reading this one. So one barrier per shuffle is enough.
  std::vector<uint32_t>& slots = shfl_slots[shfl_parity ^= 1];
  slots[t] = bits;
  warp_barriers[t / kWarp]->arrive_and_wait();
  return slots[(t & ~(kWarp - 1)) | ((t % kWarp) ^ unsigned(lane_mask))];
}

void launch(dim3 grid, dim3 block, const std::function<void()>& kernel) {
  const unsigned n = block.x;
  if (block.y != 1 || block.z != 1 || grid.z != 1 || n == 0 || n > 1024 || n % kWarp != 0) {
    shim_fail("blocks must be 1-D, of whole warps, at most 1024 threads; grids at most 2-D");
  }
  gridDim = grid;
  blockDim = block;
  block_barrier = std::make_unique<std::barrier<>>(n);
  warp_barriers.clear();
  for (unsigned w = 0; w < n / kWarp; ++w) {
    warp_barriers.push_back(std::make_unique<std::barrier<>>(kWarp));
  }
  shfl_slots[0].assign(n, 0);
  shfl_slots[1].assign(n, 0);
  // Apart from __syncthreads: a thread that returns early must not start the next block
  // (and overwrite __shared__ arrays) while the others still work on this one.
  std::barrier block_done(n);

  // One block's worth of threads for the whole grid: each runs its thread of every block in
  // turn, so blocks run one after another and never more than n threads exist.
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < n; ++t) {
    threads.emplace_back([&, t] {
      threadIdx = {t, 0, 0};
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = {x, y, 0};
          kernel();
          block_done.arrive_and_wait();
        }
      }
    });
  }
  for (std::thread& th : threads) th.join();
}
