// The selective-scan steps (Mamba's mamba_update.h, Mamba-2's mamba2.h) keep a row's Bn and Cn in
// registers when the state width N is a few SIMD vectors: the width in vectors is a template argument
// of their per-channel loop. This picks it once per call.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

namespace hybridssm::step {

// make(std::integral_constant<int, NV>{}) with NV = N / (SIMD width) when that is a whole 1..4, else
// NV = 0 (the loop for any N); returns what make returns (a function pointer, typically).
template <typename scalar_t, typename Make>
inline auto with_state_vectors(int64_t N, const Make& make) {
  constexpr int64_t W = at::vec::Vectorized<scalar_t>::size();
  switch (N % W == 0 ? N / W : 0) {
    case 1: return make(std::integral_constant<int, 1>{});
    case 2: return make(std::integral_constant<int, 2>{});
    case 3: return make(std::integral_constant<int, 3>{});
    case 4: return make(std::integral_constant<int, 4>{});
    default: return make(std::integral_constant<int, 0>{});
  }
}

}  // namespace hybridssm::step
