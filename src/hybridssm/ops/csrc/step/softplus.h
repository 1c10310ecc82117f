// softplus for the Mamba step's delta, in fp32 without library calls.
//
// torch's form, log1p(exp(x)) below the threshold 20 and x above it, costs two out-of-line Sleef
// calls per vector (exp and log1p, both 1-ULP), which at many streams took a third as long as the
// whole state update. Here, with t = exp(-|x|) in (0, 1],
//
//   softplus(x) = max(x, 0) + log1p(t)      (x <= 20),   x (x > 20 or NaN)
//
// exp: Cody-Waite reduction y = k ln2 + r (|r| <= ln2 / 2, ln2 split in two so k ln2 is exact) and
// the degree-7 Taylor polynomial of exp(r) (remainder r^8 / 8! < 6e-9 relative, under 0.1 ULP);
// 2^k is applied in two factors so that results down to the smallest denormal come out as torch's.
// log1p: w = 1 + t rounded, c = t - (w - 1) its rounding error (exact); w = 2^j m with m in
// [sqrt(1/2), sqrt(2)], f = m - 1 (exact), log(1 + f) = f - (f^2/2 - s (f^2/2 + R)), s = f / (2 + f),
// R = s^2 (2/3 + 2/5 s^2 + 2/7 s^4 + 2/9 s^6) (the series of 2 atanh(s) = log(1 + f); with
// s^2 < 0.03 the first omitted term is below 1e-9 relative); log1p(t) = j ln2 + log(1 + f) + c / w.
//
// Bound (tests/ops/test_step_softplus.py, a dense grid over -110..30 and the special values): at
// most 3 ULP from torch.nn.functional.softplus where torch's result is a normal float; below that,
// within one denormal step (1.4e-45) of the exact value, as torch's is (the two differ by two steps
// at most); +-inf, NaN, -0 and the threshold as torch.

#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace hybridssm::step {

// softplus of K vectors in place, each step applied to all K before the next (a chain of ~60
// dependent ops per vector: in lockstep K chains overlap in program order, decay_exp.h's
// decay_exp_f32_n says why that matters); the same operations on each vector as K = 1.
template <int K>
inline void softplus_f32_n(at::vec::Vectorized<float> (&x)[K]) {
  using Vec = at::vec::Vectorized<float>;
  using IVec = at::vec::Vectorized<int32_t>;
  const Vec zero(0.f), one(1.f);
  const Vec ln2_hi(0.693145751953125f), ln2_lo(1.428606765330187e-06f);  // ln2_hi: 16 significant bits
  // t = exp(y), y = -|x| in [-104, 0] (below -104 exp(y) rounds to 0 in fp32)
  Vec y[K], k[K], r[K], p[K];
  for (int i = 0; i < K; ++i) y[i] = at::vec::maximum(x[i].abs().neg(), Vec(-104.f));
  for (int i = 0; i < K; ++i) k[i] = at::vec::fmadd(y[i], Vec(1.4426950408889634f), Vec(0.5f)).floor();
  for (int i = 0; i < K; ++i) r[i] = at::vec::fmadd(k[i], ln2_hi.neg(), y[i]);
  for (int i = 0; i < K; ++i) r[i] = at::vec::fmadd(k[i], ln2_lo.neg(), r[i]);
  for (int i = 0; i < K; ++i) p[i] = at::vec::fmadd(Vec(1.f / 5040.f), r[i], Vec(1.f / 720.f));
  for (int i = 0; i < K; ++i) p[i] = at::vec::fmadd(p[i], r[i], Vec(1.f / 120.f));
  for (int i = 0; i < K; ++i) p[i] = at::vec::fmadd(p[i], r[i], Vec(1.f / 24.f));
  for (int i = 0; i < K; ++i) p[i] = at::vec::fmadd(p[i], r[i], Vec(1.f / 6.f));
  for (int i = 0; i < K; ++i) p[i] = at::vec::fmadd(p[i], r[i], Vec(0.5f));
  for (int i = 0; i < K; ++i) p[i] = at::vec::fmadd(p[i], r[i], one);
  for (int i = 0; i < K; ++i) p[i] = at::vec::fmadd(p[i], r[i], one);
  // 2^k = 2^k1 2^k2 with k1 = floor(k / 2): both factors are normal floats for k >= -151
  Vec t[K];
  for (int i = 0; i < K; ++i) {
    const IVec ki = at::vec::convert_to_int_of_same_size(k[i]);
    const IVec k1 = ki >> IVec(1), k2 = ki - k1;
    const IVec bias(127), mant(23);
    t[i] = p[i] * at::vec::cast<float>((k1 + bias) << mant) * at::vec::cast<float>((k2 + bias) << mant);
  }
  // log1p(t), t in [0, 1]
  Vec w[K], cw[K], j[K], f[K], s[K], z[K], R[K], h[K];
  for (int i = 0; i < K; ++i) w[i] = one + t[i];
  for (int i = 0; i < K; ++i) cw[i] = (t[i] - (w[i] - one)) / w[i];  // the rounding error of w, over w
  for (int i = 0; i < K; ++i) {
    const Vec big = w[i] > Vec(1.41421356f);
    j[i] = Vec::blendv(zero, one, big);
    f[i] = Vec::blendv(w[i], w[i] * Vec(0.5f), big) - one;
  }
  for (int i = 0; i < K; ++i) s[i] = f[i] / (Vec(2.f) + f[i]);
  for (int i = 0; i < K; ++i) z[i] = s[i] * s[i];
  for (int i = 0; i < K; ++i) R[i] = at::vec::fmadd(z[i], Vec(2.f / 9.f), Vec(2.f / 7.f));
  for (int i = 0; i < K; ++i) R[i] = at::vec::fmadd(z[i], R[i], Vec(2.f / 5.f));
  for (int i = 0; i < K; ++i) R[i] = at::vec::fmadd(z[i], R[i], Vec(2.f / 3.f));
  for (int i = 0; i < K; ++i) R[i] = z[i] * R[i];
  for (int i = 0; i < K; ++i) h[i] = Vec(0.5f) * f[i] * f[i];  // f^2 / 2
  for (int i = 0; i < K; ++i) {
    const Vec log1pf = f[i] - (h[i] - s[i] * (h[i] + R[i]));
    const Vec log1pt = at::vec::fmadd(j[i], ln2_hi, at::vec::fmadd(j[i], ln2_lo, cw[i]) + log1pf);
    const Vec out = at::vec::maximum(x[i], zero) + log1pt;
    x[i] = Vec::blendv(out, x[i], (x[i] > Vec(20.f)) | (x[i] != x[i]));
  }
}

inline at::vec::Vectorized<float> softplus_f32(const at::vec::Vectorized<float>& x) {
  at::vec::Vectorized<float> v[1] = {x};
  softplus_f32_n(v);
  return v[0];
}

}  // namespace hybridssm::step
