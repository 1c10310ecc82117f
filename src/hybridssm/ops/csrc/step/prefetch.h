// Software prefetch for the steps: a layer's states (the delta rules' [B, H, K, V], Mamba-2's
// [B, H, P, N]) are far beyond L2 at B = 64 and read in strips the hardware prefetcher does not run
// ahead of; attention's next (row, kv head) cache slots and a prefill's next weight block start
// where the prefetcher cannot guess. A step asks for what it reads next while it computes.
#pragma once

#include <cstdint>

namespace hybridssm::step {

// Ask for the cache lines of p[0, n) (read then written: the states are updated in place); a hint,
// it never faults.
template <typename scalar_t>
inline void prefetch_span(const scalar_t* p, int64_t n) {
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  for (int64_t i = 0; i < n; i += kLine) __builtin_prefetch(p + i, 1, 3);
}

// Ask for bytes [0, n) of p, to be read (attention's cache slots, a weight block); a hint, it never
// faults and leaves values alone. The hardware prefetcher follows a stream within a 4 KB page but
// does not guess the next page, nor where the next (row, kv head) or weight block starts.
inline void prefetch_bytes(const void* p, int64_t n) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < n; o += 64) __builtin_prefetch(c + o, 0, 3);
}

}  // namespace hybridssm::step
