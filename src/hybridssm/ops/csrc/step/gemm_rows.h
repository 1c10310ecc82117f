// x [B, I] @ W[O, I]^T (+ bias) for every step's projections at many streams (4 < B <= 128; common.h's
// linear_small calls it).
//
// At these batch sizes a step's weights are cold (a model's layers do not fit in L2) and MKL's sgemm
// first packs the whole weight, a pass that waits on memory without computing (a third of the GEMM's
// time at B = 64 in the profiles), then computes. This kernel reads W where it lies instead: dot
// products of 3 rows of x with 4 rows of W over I (12 accumulators, 16 registers with the loads),
// 4 rows of W at a time against every row of x (W is read once, in order; x stays in L2), while it
// prefetches the next 4 rows of W, so the weight's reads overlap the FMAs. Alone it matches MKL on
// hot weights and takes 0.75-0.9 of its time on cold ones at B = 64 (0.45-0.8 at B = 16); inside a
// model's step (hybrid[gru], B = 64, perf) about 0.9 of MKL's time per FLOP: x is re-read from L2
// for every 4 rows of W. Beyond 128 rows, or for thin inputs (I < 32: a few FMAs per horizontal
// sum), MKL is faster. Every step's projections take it since whole models at B = 64 ran 5-25%
// more frames/s with it than with MKL (mamba, transformer, hybrid, hymba, the delta rules; two
// alternating runs at load ~1.5), the recurrent mixers' first.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "../vec_helpers.h"

#include <algorithm>
#include <cstdint>

namespace hybridssm::step {

using at::vec::Vectorized;

namespace gemm_rows_detail {

// out[j] = the sum of acc[j]'s lanes, j < 4.
template <typename scalar_t>
inline void hsum4(const Vectorized<scalar_t>* acc, scalar_t* out) {
  for (int j = 0; j < 4; ++j) out[j] = hybridssm::hsum(acc[j]);
}

#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
template <>
inline void hsum4<float>(const Vectorized<float>* acc, float* out) {
  const __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]), t1 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 u = _mm256_hadd_ps(t0, t1);  // [s0 s1 s2 s3 | s0' s1' s2' s3'] (the two halves' sums)
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1)));
}
#endif

// y[i, j] = x[i, :] . W[j, :] (+ bias[j]) for i < MB, j < NB <= 4; W's rows are I apart.
template <typename scalar_t, int MB, int NB>
inline void block(const scalar_t* x, int64_t ldx, const scalar_t* W, int64_t I, const scalar_t* bias,
                  scalar_t* y, int64_t ldy) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t L = Vec::size();
  Vec acc[MB][4];
  for (int i = 0; i < MB; ++i) {
    for (int j = 0; j < 4; ++j) acc[i][j] = Vec(0);
  }
  auto step = [&](int64_t k, int64_t cnt) {
    Vec xv[MB];
    for (int i = 0; i < MB; ++i) xv[i] = hybridssm::load(x + i * ldx + k, cnt);
    for (int j = 0; j < NB; ++j) {
      const Vec w = hybridssm::load(W + j * I + k, cnt);
      for (int i = 0; i < MB; ++i) acc[i][j] = at::vec::fmadd(xv[i], w, acc[i][j]);
    }
  };
  int64_t k = 0;
  for (; k + L <= I; k += L) step(k, L);
  if (k < I) step(k, I - k);
  for (int i = 0; i < MB; ++i) {
    scalar_t s[4];
    hsum4<scalar_t>(acc[i], s);
    for (int j = 0; j < NB; ++j) y[i * ldy + j] = s[j] + (bias != nullptr ? bias[j] : scalar_t(0));
  }
}

// NB rows of W against all B rows of x, prefetching `next_len` values at `next` (the following
// rows of W) spread over the row blocks.
template <typename scalar_t, int NB>
inline void column(const scalar_t* x, int64_t ldx, const scalar_t* W, int64_t I, const scalar_t* bias,
                   scalar_t* y, int64_t ldy, int64_t B, const scalar_t* next, int64_t next_len) {
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  const int64_t per_block = (next_len + kLine * ((B + 2) / 3) - 1) / (kLine * ((B + 2) / 3));
  int64_t pf = 0, r = 0;
  for (; r + 3 <= B; r += 3) {
    for (int64_t e = 0; e < per_block && pf < next_len; ++e, pf += kLine) __builtin_prefetch(next + pf, 0, 3);
    block<scalar_t, 3, NB>(x + r * ldx, ldx, W, I, bias, y + r * ldy, ldy);
  }
  if (B - r == 2) block<scalar_t, 2, NB>(x + r * ldx, ldx, W, I, bias, y + r * ldy, ldy);
  if (B - r == 1) block<scalar_t, 1, NB>(x + r * ldx, ldx, W, I, bias, y + r * ldy, ldy);
}

// y[B, O] (rows ldy apart) = x[B, I] (rows ldx apart) W[O, I]^T (+ bias); W contiguous.
template <typename scalar_t>
void gemm_nt(const scalar_t* x, int64_t ldx, const scalar_t* W, const scalar_t* bias, scalar_t* y,
             int64_t ldy, int64_t B, int64_t O, int64_t I) {
  auto b = [&](int64_t o) { return bias != nullptr ? bias + o : nullptr; };
  int64_t o = 0;
  for (; o + 4 <= O; o += 4) {
    const int64_t next_rows = std::min<int64_t>(4, O - o - 4);
    column<scalar_t, 4>(x, ldx, W + o * I, I, b(o), y + o, ldy, B, W + (o + 4) * I, next_rows * I);
  }
  switch (O - o) {
    case 3: return column<scalar_t, 3>(x, ldx, W + o * I, I, b(o), y + o, ldy, B, nullptr, 0);
    case 2: return column<scalar_t, 2>(x, ldx, W + o * I, I, b(o), y + o, ldy, B, nullptr, 0);
    case 1: return column<scalar_t, 1>(x, ldx, W + o * I, I, b(o), y + o, ldy, B, nullptr, 0);
    default: return;
  }
}

// ---- the input-major product x @ W for W [I, O] (Griffin's block-diagonal gates) ------------------
// Per row (vecmat_add) each input reloads and stores the accumulators; here 6 rows by 2 vectors of
// columns stay in registers (12 FMAs per 2 loads of W and 6 broadcasts). Measured against MKL on
// the thin LoRA shapes (I = 32..256, O = 64..256): equal on hot weights and slower on cold ones
// (the strided column panel defeats the prefetcher), so it serves L1-resident weights only.
//
// y[i, :] = x[i, :] @ W (+ bias) for i < MB over NV vectors of columns
// starting at W (row stride ldw), the last holding `tail` columns (a full vector when tail == L).
template <typename scalar_t, int MB, int NV>
inline void block_nn(const scalar_t* x, int64_t ldx, const scalar_t* W, int64_t ldw, int64_t I,
                     const scalar_t* bias, scalar_t* y, int64_t ldy, int64_t tail) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t L = Vec::size();
  auto cnt = [&](int v) { return v + 1 == NV ? tail : L; };
  Vec acc[MB][NV];
  for (int v = 0; v < NV; ++v) {
    const Vec b0 = bias != nullptr ? hybridssm::load(bias + v * L, cnt(v)) : Vec(0);
    for (int i = 0; i < MB; ++i) acc[i][v] = b0;
  }
  for (int64_t k = 0; k < I; ++k) {
    Vec w[NV];
    for (int v = 0; v < NV; ++v) w[v] = hybridssm::load(W + k * ldw + v * L, cnt(v));
    for (int i = 0; i < MB; ++i) {
      const Vec xi(x[i * ldx + k]);
      for (int v = 0; v < NV; ++v) acc[i][v] = at::vec::fmadd(xi, w[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    for (int v = 0; v < NV; ++v) hybridssm::store(acc[i][v], y + i * ldy + v * L, cnt(v));
  }
}

// All B rows against NV vectors of columns, 6 rows at a time (12 accumulators at NV = 2).
template <typename scalar_t, int NV>
inline void column_nn(const scalar_t* x, int64_t ldx, const scalar_t* W, int64_t ldw, int64_t I,
                      const scalar_t* bias, scalar_t* y, int64_t ldy, int64_t B, int64_t tail) {
  int64_t r = 0;
  for (; r + 6 <= B; r += 6) block_nn<scalar_t, 6, NV>(x + r * ldx, ldx, W, ldw, I, bias, y + r * ldy, ldy, tail);
  for (; r < B; ++r) block_nn<scalar_t, 1, NV>(x + r * ldx, ldx, W, ldw, I, bias, y + r * ldy, ldy, tail);
}

// y[B, O] (rows ldy apart) = x[B, I] (rows ldx apart) @ W[I, O] (rows ldw apart) (+ bias[O]).
template <typename scalar_t>
void gemm_nn(const scalar_t* x, int64_t ldx, const scalar_t* W, int64_t ldw, const scalar_t* bias,
             scalar_t* y, int64_t ldy, int64_t B, int64_t O, int64_t I) {
  constexpr int64_t L = Vectorized<scalar_t>::size();
  auto b = [&](int64_t o) { return bias != nullptr ? bias + o : nullptr; };
  int64_t o = 0;
  for (; o + 2 * L <= O; o += 2 * L) column_nn<scalar_t, 2>(x, ldx, W + o, ldw, I, b(o), y + o, ldy, B, L);
  if (O - o > L) {
    column_nn<scalar_t, 2>(x, ldx, W + o, ldw, I, b(o), y + o, ldy, B, O - o - L);
  } else if (O > o) {
    column_nn<scalar_t, 1>(x, ldx, W + o, ldw, I, b(o), y + o, ldy, B, O - o);
  }
}

}  // namespace gemm_rows_detail

constexpr int64_t kGemmRowsMaxBatch = 128;  // beyond, MKL's packed GEMM wins (measured at B = 256)
constexpr int64_t kGemmRowsMinInputs = 32;  // below, the horizontal sums outweigh the FMAs

}  // namespace hybridssm::step
