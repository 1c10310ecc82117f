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

// exp(x) for x <= 0 (see the header) of K vectors in place, each step applied to all K before the
// next: the K dependency chains (~50 cycles each) then overlap in program order, where one vector at
// a time left the out-of-order core to find the next chain past a scheduler full of waiting ops.
// The same operations on each vector as K = 1, so the same values.
template <int K>
inline void decay_exp_f32_n(at::vec::Vectorized<float> (&x)[K]) {
  using Vec = at::vec::Vectorized<float>;
  const Vec magic(12582912.f);  // 1.5 2^23: adding it rounds to an integer (|x log2(e)| < 2^22)
  Vec s[K], k[K], r[K], q[K];
  for (int i = 0; i < K; ++i) s[i] = at::vec::fmadd(x[i], Vec(1.44269504088896341f), magic);
  for (int i = 0; i < K; ++i) k[i] = s[i] - magic;
  for (int i = 0; i < K; ++i) r[i] = at::vec::fmadd(k[i], Vec(-0.693145751953125f), x[i]);
  for (int i = 0; i < K; ++i) r[i] = at::vec::fmadd(k[i], Vec(-1.428606765330187e-06f), r[i]);
  for (int i = 0; i < K; ++i) q[i] = at::vec::fmadd(Vec(1.384360716e-3f), r[i], Vec(8.374195546e-3f));
  for (int i = 0; i < K; ++i) q[i] = at::vec::fmadd(q[i], r[i], Vec(4.166800529e-2f));
  for (int i = 0; i < K; ++i) q[i] = at::vec::fmadd(q[i], r[i], Vec(1.666643023e-1f));
  for (int i = 0; i < K; ++i) q[i] = at::vec::fmadd(q[i], r[i], Vec(4.999999404e-1f));
  for (int i = 0; i < K; ++i) q[i] = at::vec::fmadd(q[i], r[i], Vec(1.f));
  for (int i = 0; i < K; ++i) q[i] = at::vec::fmadd(q[i], r[i], Vec(1.f));  // p
  // s's low 9 mantissa bits hold k mod 2^9; shifted into the exponent field they add k to p's exponent;
  // below -125 ln2 the result is 0 (NaN stays NaN: the mask keeps unordered lanes)
  const Vec lowest(-86.6433906f);  // -125 ln2
  for (int i = 0; i < K; ++i) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
    // two ops for the flush where the blend below takes three (a compare, a sign test, an and-not)
    const __m256i k_exp = _mm256_slli_epi32(_mm256_castps_si256(s[i]), 23);
    const __m256 scaled = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(q[i]), k_exp));
    x[i] = _mm256_and_ps(scaled, _mm256_cmp_ps(x[i], lowest, _CMP_NLT_UQ));
#else
    using IVec = at::vec::Vectorized<int32_t>;
    const IVec k_exp = at::vec::cast<int32_t>(s[i]) << IVec(23);
    const Vec scaled = at::vec::cast<float>(at::vec::cast<int32_t>(q[i]) + k_exp);
    x[i] = Vec::blendv(scaled, Vec(0.f), x[i] < lowest);
#endif
  }
}

// exp(x) for x <= 0 (see the header): the Mamba step's fp32 decay
inline at::vec::Vectorized<float> decay_exp_f32(const at::vec::Vectorized<float>& x) {
  at::vec::Vectorized<float> v[1] = {x};
  decay_exp_f32_n(v);
  return v[0];
}

}  // namespace hybridssm::step
