// SIMD helpers shared by the fused CPU kernels: loads and stores of a possibly partial vector (the
// tail of a row that is not a multiple of the SIMD width) and a horizontal sum.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace hybridssm {

template <typename scalar_t>
inline at::vec::Vectorized<scalar_t> load(const scalar_t* p, int64_t cnt) {
  using Vec = at::vec::Vectorized<scalar_t>;
  return cnt == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, cnt);
}

template <typename scalar_t>
inline void store(const at::vec::Vectorized<scalar_t>& x, scalar_t* p, int64_t cnt) {
  using Vec = at::vec::Vectorized<scalar_t>;
  if (cnt == Vec::size()) {
    x.store(p);
  } else {
    x.store(p, cnt);
  }
}

template <typename scalar_t>
inline scalar_t hsum(const at::vec::Vectorized<scalar_t>& x) {
  using Vec = at::vec::Vectorized<scalar_t>;
  alignas(64) scalar_t tmp[Vec::size()];
  x.store(tmp);
  scalar_t s = 0;
  for (int64_t l = 0; l < Vec::size(); ++l) s += tmp[l];
  return s;
}

}  // namespace hybridssm
