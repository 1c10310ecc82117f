// The Mamba step's decay exp(delta A) in fp32, without library calls.
//
// The update takes one exp per state element, and that exp was most of its vector work (at::vec's
// exp_u20: 17 vector ops, with two range clamps, a floor, and the scaling as two multiplies). Here:
//
//   k = round(x log2(e)),  r = x - k ln2  (|r| <= ln2 / 2),  exp(x) = 2^k p(r)
//
// - the rounding adds 1.5 2^23 in the FMA x log2(e) + 1.5 2^23: k then sits in the sum's low
//   mantissa bits, which, shifted into the exponent field, scale p by one integer add (no convert);
// - r in two FMAs with ln2 split in two (the high part has 16 significant bits), so that r is exact
//   to fp32 rounding for every k: the error does not grow with |x|;
// - p(r) = 1 + r (1 + r q(r)), q of degree 4 fitted for the least relative error of p on
//   [-ln2 / 2, ln2 / 2] (2e-9; 1.25 ULP with fp32 coefficients and Horner FMAs); p(0) = 1, so a
//   zero delta keeps the state exactly;
// - x < -125 ln2 (the scaled exponent would leave the normal range) gives 0: the exact value is then
//   below 2^-125, and exp_u20 flushes the same way below 2^-126. NaN stays NaN, -inf gives 0.
// 14 vector ops. Measured alone it made the update no faster (the update was held up by its delta
// chunks, mamba_update.h): it is kept for its accuracy at equal cost.
//
// Domain: x <= 0 (a decay: delta >= 0, A < 0). Bound (tests/ops/test_step_decay_exp.py, a dense
// sweep of delta in [1e-4, 20] and A in [-1e3, -1e-3]): within 1.5 ULP of the exact exp of
// fp32(delta A), the value torch.exp rounds, where that is at least 2^-125; exp_u20 is up to 4.7 ULP.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace hybridssm::step {

// exp(x) for x <= 0 (see the header): the Mamba step's fp32 decay
inline at::vec::Vectorized<float> decay_exp_f32(const at::vec::Vectorized<float>& x) {
  using Vec = at::vec::Vectorized<float>;
  using IVec = at::vec::Vectorized<int32_t>;
  const Vec magic(12582912.f);  // 1.5 2^23: adding it rounds to an integer (|x log2(e)| < 2^22)
  const Vec s = at::vec::fmadd(x, Vec(1.44269504088896341f), magic);
  const Vec k = s - magic;
  Vec r = at::vec::fmadd(k, Vec(-0.693145751953125f), x);
  r = at::vec::fmadd(k, Vec(-1.428606765330187e-06f), r);
  Vec q(1.384360716e-3f);
  q = at::vec::fmadd(q, r, Vec(8.374195546e-3f));
  q = at::vec::fmadd(q, r, Vec(4.166800529e-2f));
  q = at::vec::fmadd(q, r, Vec(1.666643023e-1f));
  q = at::vec::fmadd(q, r, Vec(4.999999404e-1f));
  q = at::vec::fmadd(q, r, Vec(1.f));
  const Vec p = at::vec::fmadd(q, r, Vec(1.f));
  // s's low 9 mantissa bits hold k mod 2^9; shifted into the exponent field they add k to p's exponent
  const IVec k_exp = at::vec::cast<int32_t>(s) << IVec(23);
  const Vec scaled = at::vec::cast<float>(at::vec::cast<int32_t>(p) + k_exp);
  return Vec::blendv(scaled, Vec(0.f), x < Vec(-86.6433906f));  // -125 ln2
}

}  // namespace hybridssm::step
