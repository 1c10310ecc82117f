// ATen's fp32 vectorised exp without a library call: Vectorized<float>::exp bit for bit.
//
// On AVX2, Vectorized<float>::exp (the exp inside ATen's silu and sigmoid; torch.exp itself takes
// MKL's where torch is built with it) is an out-of-line call to Sleef's expf (1-ULP,
// Sleef_expf8_u10). At many streams the Mamba step spent ~4% of its time in those calls (the
// conv's and the gate's SiLU, A = -exp(A_log) each step). Here the same exp is written out in the
// caller, the same operations in the same order, so the same bits:
//
//   q = rint(d log2(e)) (one multiply, then the round-to-nearest-even convert),
//   s = d - q ln2 in two FMAs (ln2 split in two), u = 1 + (s + s^2 p(s)) with p of degree 5 in
//   Horner FMAs, u 2^q as two factors 2^(q >> 1) 2^(q - (q >> 1)) (each a normal float),
//   0 below d = -104, +inf above 100.
//
// K vectors run in lockstep (decay_exp.h's decay_exp_f32_n says why). Other instruction sets call
// Vectorized<float>::exp itself. Tested bit for bit against Vectorized<float>::exp and torch's silu
// over every float exponent, +-0, denormals, +-inf and NaN (tests/ops/test_step_silu_exp.py).

#pragma once

#include <ATen/cpu/vec/vec.h>

namespace hybridssm::step {

// exp of K vectors in place, each step applied to all K before the next.
template <int K>
inline void aten_exp_f32_n(at::vec::Vectorized<float> (&x)[K]) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
  __m256 s[K], u[K];
  __m256i q[K];
  for (int i = 0; i < K; ++i) {
    q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(x[i], _mm256_set1_ps(1.442695040888963407359924681001892137f)));
  }
  for (int i = 0; i < K; ++i) {
    const __m256 qf = _mm256_cvtepi32_ps(q[i]);
    s[i] = _mm256_fmadd_ps(qf, _mm256_set1_ps(-0.693145751953125f), x[i]);
    s[i] = _mm256_fmadd_ps(qf, _mm256_set1_ps(-1.428606765330187045e-06f), s[i]);
  }
  for (int i = 0; i < K; ++i) {
    u[i] = _mm256_fmadd_ps(_mm256_set1_ps(0.000198527617612853646278381f), s[i],
                           _mm256_set1_ps(0.00139304355252534151077271f));
  }
  for (int i = 0; i < K; ++i) u[i] = _mm256_fmadd_ps(u[i], s[i], _mm256_set1_ps(0.00833336077630519866943359f));
  for (int i = 0; i < K; ++i) u[i] = _mm256_fmadd_ps(u[i], s[i], _mm256_set1_ps(0.0416664853692054748535156f));
  for (int i = 0; i < K; ++i) u[i] = _mm256_fmadd_ps(u[i], s[i], _mm256_set1_ps(0.166666671633720397949219f));
  for (int i = 0; i < K; ++i) u[i] = _mm256_fmadd_ps(u[i], s[i], _mm256_set1_ps(0.5f));
  for (int i = 0; i < K; ++i) {
    u[i] = _mm256_add_ps(_mm256_set1_ps(1.f), _mm256_fmadd_ps(_mm256_mul_ps(s[i], s[i]), u[i], s[i]));
  }
  const __m256i bias = _mm256_set1_epi32(0x7f);
  for (int i = 0; i < K; ++i) {
    const __m256i q1 = _mm256_srai_epi32(q[i], 1), q2 = _mm256_sub_epi32(q[i], q1);
    const __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(q1, bias), 23));
    const __m256 f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(q2, bias), 23));
    u[i] = _mm256_mul_ps(_mm256_mul_ps(u[i], f1), f2);
  }
  for (int i = 0; i < K; ++i) {
    u[i] = _mm256_andnot_ps(_mm256_cmp_ps(x[i], _mm256_set1_ps(-104.f), _CMP_LT_OQ), u[i]);
    x[i] = _mm256_blendv_ps(u[i], _mm256_set1_ps(__builtin_inff()),
                            _mm256_cmp_ps(_mm256_set1_ps(100.f), x[i], _CMP_LT_OQ));
  }
#else
  for (int i = 0; i < K; ++i) x[i] = x[i].exp();
#endif
}

}  // namespace hybridssm::step
