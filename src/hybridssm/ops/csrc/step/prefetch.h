// Software prefetch for the recurrent steps at many streams: a layer's states (the delta rules'
// [B, H, K, V], Mamba-2's [B, H, P, N]) are far beyond L2 at B = 64, and each head's state is read
// in short strided strips that the hardware prefetcher does not run ahead of, so a step fetches the
// state it reads next while it computes on the current one.
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

}  // namespace hybridssm::step
