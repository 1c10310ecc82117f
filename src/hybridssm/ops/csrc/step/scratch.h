// Scratch memory for a step kernel's intermediates: buffers from the calling thread's arena, handed
// back together when the kernel returns.
//
// At batch 1 a mixer's step is a handful of small products and loops between its weight reads, and
// an at::empty per intermediate (a dispatched op, a TensorImpl, the allocator's lists: each cold after
// the step's megabytes of weights went through the caches) cost about as much as the small work
// itself. Here a buffer is a pointer bump in memory that the thread already owns and touched at its
// previous step.
//
// Measured (the mixers' kernels moved onto it, with their products written into it by linear_into: a batch-1
// mixer step went from 3-12 ATen ops to its output's one allocation; a model's batch-1 step, ATen ops as
// torch.profiler lists them: hybrid[rwkv] 136 -> 56 ops per step, hybrid[griffin_lru] 156 -> 136, transformer
// 101 -> 93, hymba 177 -> 169, hybrid[gru] / hybrid[delta_net] 96 -> 84, hybrid[gated_ssm] 116 -> 84). The
// batch-1 step against the tree before (bench_step.py --against, 3 alternating runs each, 2 shared cores at
// load 1.2-2.8, four runs): hybrid[rwkv] 1.07-1.27x faster, hybrid[griffin_lru] 1.04-1.52x, transformer
// 1.04-1.72x, hymba 0.98-1.26x, hybrid[gru] 1.04-1.51x, hybrid[delta_net] 1.01-1.90x; the larger gains in the
// loaded minutes, where each op's cold lines cost most. At B = 64 no slower (64 streams with resets, 3 alternating
// pairs: 1.00-1.29x).
//
//   Scratch s;                              // a frame: everything taken below is handed back at its end
//   float* h = s.take<float>(B * D);       // 64-byte aligned, uninitialised
//
// Frames nest (a kernel calling another that takes its own frame) and end in reverse order, as scopes
// do. A pointer stays valid until its frame ends: the arena's blocks never move (a request that does
// not fit opens the next block, kept for later steps). The arena is the thread's own (thread_local), so
// two threads stepping two models, or one model from two threads, never share a buffer; a kernel's
// parallel workers take their own frames on their own threads. The memory grows to the largest step a
// thread ran and is freed when the thread ends.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

namespace hybridssm::step {

class ScratchArena {
 public:
  static constexpr int64_t kAlign = 64;
  static constexpr int64_t kBlockBytes = int64_t(1) << 20;

  // The calling thread's arena.
  static ScratchArena& local() {
    thread_local ScratchArena arena;
    return arena;
  }

  struct Mark {
    int64_t block;
    int64_t used;
  };

  Mark mark() const { return {current_, used_}; }
  void release(const Mark& m) { current_ = m.block, used_ = m.used; }

  // `bytes` of memory, kAlign-aligned, valid until the frame that took them ends.
  void* take(int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "hybridssm step scratch: cannot take ", bytes, " bytes");
    bytes = (bytes + kAlign - 1) / kAlign * kAlign;
    if (current_ < 0 || used_ + bytes > blocks_[current_].bytes) {
      // the next block: the blocks after the current one hold no live buffer (frames end in order),
      // so one too small for this request is replaced
      const int64_t next = current_ + 1;
      const int64_t size = std::max(kBlockBytes, bytes);
      if (next == static_cast<int64_t>(blocks_.size())) {
        blocks_.push_back(Block{allocate(size), size});
      } else if (blocks_[next].bytes < bytes) {
        blocks_[next] = Block{allocate(size), size};
      }
      current_ = next;
      used_ = 0;
    }
    void* p = blocks_[current_].data.get() + used_;
    used_ += bytes;
    return p;
  }

  // Bytes held in blocks (for tests: the arena keeps them between steps).
  int64_t reserved() const {
    int64_t total = 0;
    for (const auto& b : blocks_) total += b.bytes;
    return total;
  }

 private:
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  struct Block {
    std::unique_ptr<char, Free> data;
    int64_t bytes = 0;
  };

  static std::unique_ptr<char, Free> allocate(int64_t bytes) {
    char* p = static_cast<char*>(std::aligned_alloc(kAlign, static_cast<size_t>(bytes)));
    TORCH_CHECK(p != nullptr, "hybridssm step scratch: out of memory taking ", bytes, " bytes");
    return std::unique_ptr<char, Free>(p);
  }

  std::vector<Block> blocks_;
  int64_t current_ = -1;  // the block being filled (-1: none yet)
  int64_t used_ = 0;      // bytes taken from it
};

// A frame of the thread's scratch arena: buffers taken from it are valid until it ends.
class Scratch {
 public:
  Scratch() : arena_(ScratchArena::local()), mark_(arena_.mark()) {}
  ~Scratch() { arena_.release(mark_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  // n uninitialised values of T (64-byte aligned)
  template <typename T>
  T* take(int64_t n) {
    return static_cast<T*>(arena_.take(n * static_cast<int64_t>(sizeof(T))));
  }

 private:
  ScratchArena& arena_;
  ScratchArena::Mark mark_;
};

}  // namespace hybridssm::step
