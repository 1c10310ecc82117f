// x [B, I] @ W[O, I]^T (+ bias) for every step's projections at many streams (4 < B <= 256; common.h's
// linear_small calls it).
//
// At these batch sizes a step's weights are cold (a model's layers do not fit in L2) and MKL's sgemm
// first packs the whole weight, a pass that waits on memory without computing (a third of the GEMM's
// time at B = 64 in the profiles), then computes. This kernel reads W where it lies instead: dot
// products of a block of rows of x (3 with AVX2's 16 vector registers, 6 with AVX-512's 32) with 4
// rows of W over I, 4 rows of W at a time against every row of x (W is read once per pass, in order;
// x stays in L2), while it prefetches the next 4 rows of W, so the weight's reads overlap the FMAs.
// The four dot products of a row end in one reduction and one store of four outputs. Rows of x
// beyond what L2 holds beside W's stream (kGemmRowsPassBytes) go in further passes over W.
//
// Measured alone (benchmarks/bench_gemm_rows.py, AVX2, the models' shapes, load ~7): MKL's rate
// times 1.25-1.6 at B = 16 hot, 1.4-2.1 cold; 1.1-1.25 at B = 64 hot, 1.4-1.6 cold; 1.0-1.25 at
// B = 256 (where without the passes it ran 0.85-0.95x). Against the previous version (per-output
// horizontal sums, 3 rows on every ISA) 1.05-1.2x hot. Thin inputs (I < 32: a few FMAs per
// reduction) stay with MKL: 0.6-0.8x of it hot at I = 16.
//
// Alone and hot, this loop runs at the FMA peak's 85-97% at B = 64 (a C++ harness timing the kernel
// without the Python call, load ~1: 78-89 GFLOP/s of the 92 that 12 independent 8-wide FMA chains
// reach); bench_gemm_rows.py's 55-66 are the same kernel under load plus the call. Tried and not
// kept (AVX2, 1 thread):
// - The broadcast form: x packed per call into 16-row transposed panels (64-byte aligned,
//   thread-local, each packed just before its first tile), 16 rows x 6 rows of W per tile (12
//   accumulators, 2 panel loads and 6 broadcasts of W per input, no horizontal sums, one 8 x 8
//   transpose per 8 rows out), the next 6 rows of W prefetched. The harness gave it 1.05-1.3x at
//   B = 16, 1.0-1.15x at B = 64 and 256 hot and cold, 0.85-0.93x at O <= 96 (the packing, O(B I),
//   against O(B I O) FMAs) and 0.6-0.75x at B = 5, 9, 17 (16-row panels: padding rows). Inside the
//   fused step it lost: the same model's step on both kernels in one process, rounds alternating,
//   thread CPU time (load 2-4): mamba 0.89-0.95x, transformer 0.93-0.97x, hybrid[delta_net] 0.93x at
//   B = 64; per product 8-20% below this kernel (48-59 against 56-65 GFLOP/s), at every shape,
//   with L1, L2 or non-temporal prefetch hints and one or two blocks of prefetch distance. A row's
//   values must not depend on the number of rows (prefill.h's linear_joint), so neither form can
//   be chosen by B.
// - Prefetching two columns of W ahead instead of one: 0.99-1.01x of the step (within noise).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "../vec_helpers.h"

#include <algorithm>
#include <cstdint>

namespace hybridssm::step {

using at::vec::Vectorized;

namespace gemm_rows_detail {

#if defined(__GNUC__) && !defined(_MSC_VER)
#define HYBRIDSSM_GEMM_INLINE inline __attribute__((always_inline))
#else
#define HYBRIDSSM_GEMM_INLINE inline
#endif

// Rows of x per block (MB), against 4 rows of W: MB * 4 accumulators, MB vectors of x and one of W
// in registers. With 16 vector registers (AVX2) 3 rows: 12 + 3 + 1; with 32 (AVX-512, 16 floats a
// vector) 6 rows: 24 + 6 + 1, a third fewer loads per FMA. The inner loops of both keep everything
// in registers (checked with objdump on the built code).
constexpr int kRowBlock = Vectorized<float>::size() >= 16 ? 6 : 3;

// y[j] = the sum of acc[j]'s lanes (+ bias[j]) for j < NB <= 4. The 4-row case reduces the four
// accumulators together and stores the four outputs at once (a handful of shuffles instead of four
// separate horizontal sums, which cost as much as the FMAs of a short row).
template <typename scalar_t, int NB>
HYBRIDSSM_GEMM_INLINE void finish(const Vectorized<scalar_t> (&acc)[4], const scalar_t* bias, scalar_t* y) {
  for (int j = 0; j < NB; ++j) y[j] = hybridssm::hsum(acc[j]) + (bias != nullptr ? bias[j] : scalar_t(0));
}

#if (defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)) && !defined(_MSC_VER)
// [sum a0, sum a1, sum a2, sum a3] of four 8-float vectors.
HYBRIDSSM_GEMM_INLINE __m128 sum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));  // the two halves' sums
}

// [sum a0, sum a1, sum a2, sum a3] of four 4-double vectors.
HYBRIDSSM_GEMM_INLINE __m256d sum4(__m256d a0, __m256d a1, __m256d a2, __m256d a3) {
  const __m256d h01 = _mm256_hadd_pd(a0, a1), h23 = _mm256_hadd_pd(a2, a3);  // [a0 a1 a0 a1] pair sums
  return _mm256_add_pd(_mm256_permute2f128_pd(h01, h23, 0x20), _mm256_permute2f128_pd(h01, h23, 0x31));
}

#if defined(CPU_CAPABILITY_AVX512)
HYBRIDSSM_GEMM_INLINE __m256 halves(__m512 a) {
  return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
}
HYBRIDSSM_GEMM_INLINE __m256d halves(__m512d a) {
  return _mm256_add_pd(_mm512_castpd512_pd256(a), _mm512_extractf64x4_pd(a, 1));
}
#else
HYBRIDSSM_GEMM_INLINE __m256 halves(__m256 a) { return a; }
HYBRIDSSM_GEMM_INLINE __m256d halves(__m256d a) { return a; }
#endif

template <>
HYBRIDSSM_GEMM_INLINE void finish<float, 4>(const Vectorized<float> (&acc)[4], const float* bias, float* y) {
  __m128 s = sum4(halves(acc[0]), halves(acc[1]), halves(acc[2]), halves(acc[3]));
  if (bias != nullptr) s = _mm_add_ps(s, _mm_loadu_ps(bias));
  _mm_storeu_ps(y, s);
}

template <>
HYBRIDSSM_GEMM_INLINE void finish<double, 4>(const Vectorized<double> (&acc)[4], const double* bias, double* y) {
  __m256d s = sum4(halves(acc[0]), halves(acc[1]), halves(acc[2]), halves(acc[3]));
  if (bias != nullptr) s = _mm256_add_pd(s, _mm256_loadu_pd(bias));
  _mm256_storeu_pd(y, s);
}
#endif

// y[i, j] = x[i, :] . W[j, :] (+ bias[j]) for i < MB, j < NB <= 4; W's rows are I apart.
template <typename scalar_t, int MB, int NB>
HYBRIDSSM_GEMM_INLINE void block(const scalar_t* x, int64_t ldx, const scalar_t* W, int64_t I,
                                 const scalar_t* bias, scalar_t* y, int64_t ldy) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t L = Vec::size();
  Vec acc[MB][4];
  for (int i = 0; i < MB; ++i) {
    for (int j = 0; j < 4; ++j) acc[i][j] = Vec(0);
  }
  int64_t k = 0;
  for (; k + L <= I; k += L) {
    Vec xv[MB];
    for (int i = 0; i < MB; ++i) xv[i] = Vec::loadu(x + i * ldx + k);
    for (int j = 0; j < NB; ++j) {
      const Vec w = Vec::loadu(W + j * I + k);
      for (int i = 0; i < MB; ++i) acc[i][j] = at::vec::fmadd(xv[i], w, acc[i][j]);
    }
  }
  if (k < I) {  // the row's tail, zero-filled past I
    const int64_t cnt = I - k;
    Vec xv[MB];
    for (int i = 0; i < MB; ++i) xv[i] = Vec::loadu(x + i * ldx + k, cnt);
    for (int j = 0; j < NB; ++j) {
      const Vec w = Vec::loadu(W + j * I + k, cnt);
      for (int i = 0; i < MB; ++i) acc[i][j] = at::vec::fmadd(xv[i], w, acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i) finish<scalar_t, NB>(acc[i], bias, y + i * ldy);
}

// The last n < MB rows of a column: block of M = n rows, found by counting M down from MB - 1.
template <typename scalar_t, int M, int NB>
HYBRIDSSM_GEMM_INLINE void rest(const scalar_t* x, int64_t ldx, const scalar_t* W, int64_t I,
                                const scalar_t* bias, scalar_t* y, int64_t ldy, int64_t n) {
  if constexpr (M > 0) {
    if (n == M) return block<scalar_t, M, NB>(x, ldx, W, I, bias, y, ldy);
    rest<scalar_t, M - 1, NB>(x, ldx, W, I, bias, y, ldy, n);
  }
}

// NB rows of W against all B rows of x, MB at a time (the last block from the few rows left),
// prefetching `next_len` values at `next` (the following rows of W) spread over the row blocks.
template <typename scalar_t, int NB>
inline void column(const scalar_t* x, int64_t ldx, const scalar_t* W, int64_t I, const scalar_t* bias,
                   scalar_t* y, int64_t ldy, int64_t B, const scalar_t* next, int64_t next_len) {
  constexpr int MB = kRowBlock;
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  const int64_t blocks = (B + MB - 1) / MB;
  const int64_t per_block = (next_len + kLine * blocks - 1) / (kLine * blocks);
  int64_t pf = 0, r = 0;
  for (; r + MB <= B; r += MB) {
    for (int64_t e = 0; e < per_block && pf < next_len; ++e, pf += kLine) __builtin_prefetch(next + pf, 0, 3);
    block<scalar_t, MB, NB>(x + r * ldx, ldx, W, I, bias, y + r * ldy, ldy);
  }
  rest<scalar_t, MB - 1, NB>(x + r * ldx, ldx, W, I, bias, y + r * ldy, ldy, B - r);
}

// y[B, O] (rows ldy apart) = x[B, I] (rows ldx apart) W[O, I]^T (+ bias); W contiguous. The rows of
// x go in passes of at most `x_bytes` (so that they stay in L2 while W streams past them: 4 rows of
// W at a time against every row of the pass, the next 4 prefetched); W is read once per pass.
template <typename scalar_t>
void gemm_nt(const scalar_t* x, int64_t ldx, const scalar_t* W, const scalar_t* bias, scalar_t* y,
             int64_t ldy, int64_t B, int64_t O, int64_t I, int64_t x_bytes) {
  constexpr int MB = kRowBlock;
  const int64_t fit = std::max<int64_t>(4 * MB, x_bytes / (I * static_cast<int64_t>(sizeof(scalar_t))));
  const int64_t passes = (B + fit - 1) / fit;
  const int64_t rows = ((B + passes - 1) / passes + MB - 1) / MB * MB;  // balanced, whole blocks
  auto b = [&](int64_t o) { return bias != nullptr ? bias + o : nullptr; };
  for (int64_t r0 = 0; r0 < B; r0 += rows) {
    const int64_t n = std::min(rows, B - r0);
    const scalar_t* xr = x + r0 * ldx;
    scalar_t* yr = y + r0 * ldy;
    int64_t o = 0;
    for (; o + 4 <= O; o += 4) {
      const int64_t next_rows = std::min<int64_t>(4, O - o - 4);
      column<scalar_t, 4>(xr, ldx, W + o * I, I, b(o), yr + o, ldy, n, W + (o + 4) * I, next_rows * I);
    }
    switch (O - o) {
      case 3: column<scalar_t, 3>(xr, ldx, W + o * I, I, b(o), yr + o, ldy, n, nullptr, 0); break;
      case 2: column<scalar_t, 2>(xr, ldx, W + o * I, I, b(o), yr + o, ldy, n, nullptr, 0); break;
      case 1: column<scalar_t, 1>(xr, ldx, W + o * I, I, b(o), yr + o, ldy, n, nullptr, 0); break;
      default: break;
    }
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

constexpr int64_t kGemmRowsMaxBatch = 256;  // up to here ahead of MKL (measured at B = 256)
constexpr int64_t kGemmRowsMinInputs = 32;  // below, the horizontal sums outweigh the FMAs
constexpr int64_t kGemmRowsPassBytes = 256 * 1024;  // rows of x per pass over W (half of L2)

}  // namespace hybridssm::step
