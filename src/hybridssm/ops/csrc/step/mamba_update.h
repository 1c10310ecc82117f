// The Mamba-1 step's per-row work after the x projection (mamba.h): the dt projection (K = R, a
// handful of FMAs per channel), softplus, the state update and the gated output, in three passes
// over each row's channels (mamba_update_row says why). From kDeltaGemmRows rows the dt projection
// of a thread's rows is one product (gemm_rows.h's gemm_nn on dt_w transposed) ahead of the rows.
//
//   delta = softplus(dt_w dt + dt_bias);  h = exp(delta A) h + delta u Bn;  y = (Cn . h + D u) silu(z)
//
// At many streams the state ([B, E, N], 2 MB a layer at B = 64) streams from beyond the L2: the loop
// prefetches the state a few channels ahead, and the state width is a template argument for the usual
// N (8, 16, 24, 32) so that Bn, Cn and each channel's accumulator live in registers.
//
// Measured (AVX2, E = 512, N = 16, one thread, the update alone against the previous version, ratios
// of medians on a loaded machine): the decays of 4 vectors in lockstep take the state pass to 0.85-0.9
// of its time, 8 vectors are slower (spills) and 2 no better than 4; the softplus of 4 chunks in
// lockstep and the dt projection as one product per thread take the delta pass to ~0.75. Tried and
// not kept: the decays of a chunk into an L1 buffer ahead of its update (no faster), and the state or
// A pinned in L1 (no faster: with the state in L3 the pass is compute-bound, ~13 cycles a vector of
// state against ~7 for the exp alone). With the caches flushed between calls, as other processes'
// traffic does, the pass is memory-bound (~11 us a row, the prefetch waiting) and the compute gains
// vanish; prefetching 4 or 16 KB ahead instead of 1 KB was within the noise there.
//
// Later (mamba at B = 64, the step in one process alternating variants in blocks of steps, medians of
// paired ratios, load 1.7-3.5): the gate's SiLU (and the conv's, conv_silu.h) is silu.h's, ATen's bit
// for bit without the out-of-line Sleef call, 4 vectors in lockstep, and A = -exp(A_log) the same
// exp (aten_exp.h): the step 0.975-0.987x (the calls were ~3.5% of its samples), batch 1 1.07-1.09x
// faster. The update was ~20% of the step's samples and 12% of those at the state prefetch, but
// without it the step took 1.07x, and 2 or 4 KB ahead was no better than 1 KB; rows cycling over 4
// state rows (L2-hot) took the step to 0.945x of the real one: memory is ~1/6 of the update, the rest
// compute, ~15 cycles a vector of state in a standalone loop with the row hot in L1, where its 13
// FMA-pipe ops a vector would take 6.5: the decays' ~50-cycle dependency chains fill the scheduler.
// Tried and not kept: Estrin's scheme for the decay's polynomial (a 5-cycle shorter chain, the same
// FMA count; 1.04x), 8 vectors in lockstep again (~1.2x standalone).

#pragma once

#include "aten_exp.h"
#include "common.h"
#include "decay_exp.h"
#include "silu.h"
#include "softplus.h"
#include "state_width.h"

#include <memory>

namespace hybridssm::step {

// The decay exp(delta A): fp32 with decay_exp.h's exp (within 1.5 ULP of the exact exp of the fp32
// product, where exp_u20 was 4.7), fp64 with the forward's exp
inline at::vec::Vectorized<float> scan_decay_exp(const at::vec::Vectorized<float>& x) { return decay_exp_f32(x); }
inline at::vec::Vectorized<double> scan_decay_exp(const at::vec::Vectorized<double>& x) { return x.exp(); }

// The same of K vectors in place (fp32: in lockstep, decay_exp_f32_n says why)
template <int K>
inline void scan_decay_exp_n(at::vec::Vectorized<float> (&x)[K]) { decay_exp_f32_n(x); }
template <int K>
inline void scan_decay_exp_n(at::vec::Vectorized<double> (&x)[K]) {
  for (int i = 0; i < K; ++i) x[i] = x[i].exp();
}

// A = -exp(A_log) over n values, with ATen's vectorised exp (fp32: written out, aten_exp.h, 4
// vectors in lockstep: a library call per vector of A was one per vector of a row's state each step)
template <typename scalar_t>
void mamba_decay_rates(const scalar_t* A_log, scalar_t* A, int64_t n) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; i + 4 * W <= n; i += 4 * W) {
      Vec v[4];
      for (int k = 0; k < 4; ++k) v[k] = Vec::loadu(A_log + i + k * W);
      aten_exp_f32_n(v);
      for (int k = 0; k < 4; ++k) v[k].neg().store(A + i + k * W);
    }
  }
  for (; i < n; i += W) {
    const int64_t cnt = std::min(W, n - i);
    hybridssm::store(hybridssm::load(A_log + i, cnt).exp().neg(), A + i, cnt);
  }
}

// One row's inputs and outputs (pointers at the row), and the weights shared by every row.
template <typename scalar_t>
struct MambaRow {
  const scalar_t* z;    // [E] the gate (second half of the in_proj row)
  const scalar_t* u;    // [E] the conv's output
  const scalar_t* dbc;  // [R + 2N] dt, Bn, Cn (after the inner norms, if any)
  const scalar_t* pre;  // [E] dt_w dt + dt_bias of the row (mamba_update_rows' product), or null
  scalar_t* h;          // [E, N] the state, updated in place
  scalar_t* y;          // [E] out
  const char* warm;     // bytes to bring into the L2 while this row computes (E lines), or null
};

template <typename scalar_t>
struct MambaWeights {
  const scalar_t* dt_w;     // [E, R]
  const scalar_t* dt_bias;  // [E]
  const scalar_t* A;        // [E, N], -exp(A_log)
  const scalar_t* D;        // [E]
  int64_t E, R, N;
  const void* next_w = nullptr;  // the weight the next GEMM reads (out_proj's), warmed into the L2
  int64_t next_w_bytes = 0;
  const scalar_t* dt_wt = nullptr;  // dt_w transposed [R, E] (common.h's transposed), or null
};

// dt_w [E, R] transposed to [R, E]: the weight of the dt projection as an input-major product
// (gemm_nn) over a thread's rows, 12 FMAs per two weight loads. Per row it was R FMAs per vector of
// channels with a loop and a reduction around them, half of the delta pass; built per call (a
// weight may change between calls) from kDeltaGemmRows rows: at one row the copy costs what it saves.
inline constexpr int64_t kDeltaGemmRows = 4;

// How far ahead (bytes) the state is prefetched: a few dozen channels of compute hide a miss.
constexpr int64_t kStatePrefetchBytes = 1024;

// softplus of delta in registers: fp32 without library calls (softplus.h, within 3 ULP of torch's),
// double as torch's log1p(exp(x)) with threshold 20
// (of K vectors in place; fp32 in lockstep, softplus_f32_n)
template <int K>
inline void mamba_softplus_n(Vectorized<float> (&x)[K]) { softplus_f32_n(x); }
template <int K>
inline void mamba_softplus_n(Vectorized<double> (&x)[K]) {
  for (int i = 0; i < K; ++i) x[i] = Vectorized<double>::blendv(x[i].exp().log1p(), x[i], x[i] > Vectorized<double>(20));
}

#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
// t[j] lane l <- t[l] lane j
inline void transpose8x8_ps(__m256* t) {
  __m256 u[8], v[8];
  for (int i = 0; i < 8; i += 2) {
    u[i] = _mm256_unpacklo_ps(t[i], t[i + 1]), u[i + 1] = _mm256_unpackhi_ps(t[i], t[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    v[i] = _mm256_shuffle_ps(u[i], u[i + 2], 0x44), v[i + 1] = _mm256_shuffle_ps(u[i], u[i + 2], 0xEE);
    v[i + 2] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0x44), v[i + 3] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm256_permute2f128_ps(v[i], v[i + 4], 0x20), t[i + 4] = _mm256_permute2f128_ps(v[i], v[i + 4], 0x31);
  }
}
#endif

// dt_w[e] . dt + dt_bias[e] of channels e0 .. e0 + ne (ne <= W; lanes past ne: unspecified), for a
// row without the product: the bias, then one FMA per r in order, as gemm_nn accumulates, so that a
// row's values do not depend on the batch it steps in. With AVX2 floats (whole chunks, R a multiple
// of 8) dt_w's rows are transposed in registers, 8 by 8; elsewhere lane 0 of a vector per channel.
template <typename scalar_t>
inline Vectorized<scalar_t> mamba_delta_pre(const MambaWeights<scalar_t>& w, const scalar_t* dt, int64_t e0,
                                            int64_t ne) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (ne == 8 && w.R % 8 == 0) {
      Vec a = Vec::loadu(w.dt_bias + e0);
      for (int64_t r0 = 0; r0 < w.R; r0 += 8) {
        __m256 t[8];
        for (int l = 0; l < 8; ++l) t[l] = _mm256_loadu_ps(w.dt_w + (e0 + l) * w.R + r0);
        transpose8x8_ps(t);
        for (int j = 0; j < 8; ++j) a = at::vec::fmadd(Vec(dt[r0 + j]), Vec(t[j]), a);
      }
      return a;
    }
  }
#endif
  alignas(64) scalar_t sums[W] = {}, lane[W];
  for (int64_t l = 0; l < ne; ++l) {
    const scalar_t* we = w.dt_w + (e0 + l) * w.R;
    Vec a(w.dt_bias[e0 + l]);
    for (int64_t r = 0; r < w.R; ++r) a = at::vec::fmadd(Vec(dt[r]), Vec(we[r]), a);
    a.store(lane);
    sums[l] = lane[0];
  }
  return Vec::loadu(sums);
}

// Chunks of W channels whose softplus runs in lockstep in the delta pass (mamba_delta_row).
inline constexpr int kDeltaLockstepChunks = 4;

// delta [E rounded up to W] of one row: softplus(dt_w[e] . dt + dt_bias[e]) with the step's
// softplus, kDeltaLockstepChunks chunks of channels at a time (their softplus chains overlap); the
// projection from row.pre where the rows' product gave it.
template <typename scalar_t>
inline void mamba_delta_row(const MambaRow<scalar_t>& row, const MambaWeights<scalar_t>& w, scalar_t* delta) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  constexpr int K = kDeltaLockstepChunks;
  auto pre = [&](int64_t e0) {
    const int64_t ne = std::min(W, w.E - e0);
    return row.pre != nullptr ? hybridssm::load(row.pre + e0, ne) : mamba_delta_pre(w, row.dbc, e0, ne);
  };
  int64_t e0 = 0;
  for (; e0 + K * W <= w.E; e0 += K * W) {
    Vec v[K];
    for (int k = 0; k < K; ++k) v[k] = pre(e0 + k * W);
    mamba_softplus_n(v);
    for (int k = 0; k < K; ++k) v[k].store(delta + e0 + k * W);
  }
  for (; e0 < w.E; e0 += W) {
    Vec v[1] = {pre(e0)};
    mamba_softplus_n(v);
    v[0].store(delta + e0);
  }
}

// Channels in lockstep (mamba_channels): CH channels of NV vectors, CH * NV = kLockstepVectors where
// the width allows (a divisor of the SIMD width's channels), so that the decays of 4 vectors overlap.
inline constexpr int kLockstepVectors = 4;
template <int NV, int W>
inline constexpr int kLockstepChannels = NV < kLockstepVectors && W % (kLockstepVectors / NV) == 0
                                             ? kLockstepVectors / NV : 1;

// CH consecutive channels' state update (NV > 0 vectors of state each, N = NV W: Bv, Cv preloaded;
// dl, u: the channels' delta and input), the decays of all CH NV vectors computed in lockstep;
// acc[c] <- the vector whose lanes sum to Cn . h_new of channel c.
template <typename scalar_t, int NV, int CH>
inline void mamba_channels(const scalar_t* Ae, scalar_t* h, const Vectorized<scalar_t>* Bv,
                           const Vectorized<scalar_t>* Cv, const scalar_t* dl, const scalar_t* u,
                           Vectorized<scalar_t>* acc) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size(), N = NV * W;
  Vec a[CH * NV];
  for (int c = 0; c < CH; ++c) {
    for (int j = 0; j < NV; ++j) a[c * NV + j] = Vec(dl[c]) * Vec::loadu(Ae + c * N + j * W);
  }
  scan_decay_exp_n(a);
  for (int c = 0; c < CH; ++c) {
    const Vec du(dl[c] * u[c]);
    acc[c] = Vec(0);
    for (int j = 0; j < NV; ++j) {
      const Vec hn = at::vec::fmadd(a[c * NV + j], Vec::loadu(h + c * N + j * W), du * Bv[j]);
      hn.store(h + c * N + j * W);
      acc[c] = at::vec::fmadd(hn, Cv[j], acc[c]);
    }
  }
}

// The same for any N (partial vectors at the end of the row; their lanes past N hold zeros).
template <typename scalar_t>
inline Vectorized<scalar_t> mamba_channel_any(const scalar_t* Ae, scalar_t* h, const scalar_t* Bn,
                                              const scalar_t* Cn, scalar_t dl, scalar_t u, int64_t N) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const Vec dlv(dl), du(dl * u);
  Vec acc(0);
  for (int64_t n0 = 0; n0 < N; n0 += W) {
    const int64_t cnt = std::min(W, N - n0);
    const Vec a = scan_decay_exp(dlv * hybridssm::load(Ae + n0, cnt));
    const Vec hn = at::vec::fmadd(a, hybridssm::load(h + n0, cnt), du * hybridssm::load(Bn + n0, cnt));
    hybridssm::store(hn, h + n0, cnt);
    acc = at::vec::fmadd(hn, hybridssm::load(Cn + n0, cnt), acc);
  }
  return acc;
}

// Channels e0 .. e0 + ne of one row (ne = W unless kPartial): the state update with the row's delta
// [W] at delta; the W sums Cn . h_new to sums [W]. NV = N / W for the unrolled widths, 0 for any N.
template <typename scalar_t, int NV, bool kPartial>
inline void mamba_state_chunk(const MambaRow<scalar_t>& row, const MambaWeights<scalar_t>& w, const scalar_t* Bn,
                              const scalar_t* Cn, const Vectorized<scalar_t>* Bv, const Vectorized<scalar_t>* Cv,
                              int64_t e0, int64_t ne, const scalar_t* delta, scalar_t* sums) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const int64_t N = w.N;
  const int64_t count = kPartial ? ne : W;
  const char* hb = reinterpret_cast<const char*>(row.h + e0 * N);
  for (int64_t b = 0; b < count * N * int64_t(sizeof(scalar_t)); b += 64) {
    __builtin_prefetch(hb + kStatePrefetchBytes + b, 1);
  }
  if (row.warm != nullptr) {
    for (int64_t l = 0; l < count; ++l) __builtin_prefetch(row.warm + (e0 + l) * 64, 0, 2);
  }
  Vec acc[W];
  if constexpr (NV > 0 && !kPartial) {
    constexpr int CH = kLockstepChannels<NV, W>;
    for (int64_t l = 0; l < W; l += CH) {
      mamba_channels<scalar_t, NV, CH>(w.A + (e0 + l) * N, row.h + (e0 + l) * N, Bv, Cv, delta + l, row.u + e0 + l,
                                       acc + l);
    }
  } else {
    for (int64_t l = 0; l < W; ++l) {
      if (l >= count) {
        acc[l] = Vec(0);
      } else if constexpr (NV > 0) {
        mamba_channels<scalar_t, NV, 1>(w.A + (e0 + l) * N, row.h + (e0 + l) * N, Bv, Cv, delta + l,
                                        row.u + e0 + l, acc + l);
      } else {
        acc[l] = mamba_channel_any<scalar_t>(w.A + (e0 + l) * N, row.h + (e0 + l) * N, Bn, Cn, delta[l],
                                             row.u[e0 + l], N);
      }
    }
  }
  hsum_lanes(acc).store(sums);
}

// Scratch floats a row needs (mamba_update_row): delta and the sums Cn . h, E each rounded up to W.
template <typename scalar_t>
inline int64_t mamba_row_scratch(int64_t E) {
  constexpr int64_t W = Vectorized<scalar_t>::size();
  return 2 * ((E + W - 1) / W * W);
}

// Chunks of W channels whose gate SiLU runs in lockstep in the output pass (mamba_gate_row).
inline constexpr int kGateLockstepChunks = 4;

// y = (sums + D u) silu(z) of one row, kGateLockstepChunks chunks of channels at a time.
template <typename scalar_t>
inline void mamba_gate_row(const MambaRow<scalar_t>& row, const MambaWeights<scalar_t>& w, const scalar_t* sums) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  constexpr int K = kGateLockstepChunks;
  auto gated = [&](int64_t e0, int64_t cnt, const Vec& g) {
    const Vec du = hybridssm::load(w.D + e0, cnt) * hybridssm::load(row.u + e0, cnt);
    hybridssm::store((hybridssm::load(sums + e0, cnt) + du) * g, row.y + e0, cnt);
  };
  int64_t e0 = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; e0 + K * W <= w.E; e0 += K * W) {
      Vec g[K];
      for (int k = 0; k < K; ++k) g[k] = Vec::loadu(row.z + e0 + k * W);
      silu_f32_n(g);
      for (int k = 0; k < K; ++k) gated(e0 + k * W, W, g[k]);
    }
  }
  for (; e0 < w.E; e0 += W) {
    const int64_t cnt = std::min(W, w.E - e0);
    gated(e0, cnt, silu(hybridssm::load(row.z + e0, cnt)));
  }
}

// One row in three passes over its channels: delta, the state update, the gated output. Each pass's
// chunks are independent of one another, so that the out-of-order core overlaps them; in one pass
// per chunk, each chunk's delta (a dot product, a softplus: a long dependent chain) waited on the
// previous chunk's state update and held up the next (measured with an earlier per-row dt
// projection: three passes took 0.7 of the one pass's time a row at B = 64, 0.85 at B = 1).
template <typename scalar_t, int NV>
void mamba_update_row(const MambaRow<scalar_t>& row, const MambaWeights<scalar_t>& w, scalar_t* scratch) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const int64_t E = w.E, tail = E % W, full = E - tail;
  scalar_t* delta = scratch;
  scalar_t* sums = scratch + mamba_row_scratch<scalar_t>(E) / 2;
  mamba_delta_row(row, w, delta);
  const scalar_t* Bn = row.dbc + w.R;
  const scalar_t* Cn = Bn + w.N;
  Vec Bv[NV > 0 ? NV : 1], Cv[NV > 0 ? NV : 1];
  for (int j = 0; j < NV; ++j) Bv[j] = Vec::loadu(Bn + j * W), Cv[j] = Vec::loadu(Cn + j * W);
  for (int64_t e0 = 0; e0 < full; e0 += W) {
    mamba_state_chunk<scalar_t, NV, false>(row, w, Bn, Cn, Bv, Cv, e0, W, delta + e0, sums + e0);
  }
  if (tail > 0) mamba_state_chunk<scalar_t, NV, true>(row, w, Bn, Cn, Bv, Cv, full, tail, delta + full, sums + full);
  mamba_gate_row(row, w, sums);
}

// Every row of the batch: xz [B, 2E] (z its second half), u [B, E], dbc [B, R + 2N], states [B, E, N],
// y [B, E]. A [E, N] = -exp(A_log) is computed once for the call (nothing derived is kept).
template <typename scalar_t>
void mamba_update_rows(const scalar_t* xz, const scalar_t* u, const scalar_t* dbc, scalar_t* ssm_state,
                       const MambaWeights<scalar_t>& w, scalar_t* y, int64_t Bsz) {
  const int64_t E = w.E, N = w.N, R = w.R;
  const auto row_fn =
      with_state_vectors<scalar_t>(N, [](auto nv) { return &mamba_update_row<scalar_t, decltype(nv)::value>; });
  // The state streams through the L2 and evicts the weights: the last rows bring out_proj's weight
  // back (one line per channel), so that its GEMM reads it from the L2.
  const int64_t lines = (w.next_w_bytes + 63) / 64;
  const int64_t warm_rows = Bsz >= 16 && w.next_w != nullptr ? std::min(Bsz, (lines + E - 1) / E) : 0;
  at::parallel_for(0, Bsz, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> scratch(mamba_row_scratch<scalar_t>(E));
    // [rows, E] dt_w dt + dt_bias, every value written by the product (no zero fill: 128 KB at B = 64)
    std::unique_ptr<scalar_t[]> pre(w.dt_wt != nullptr ? new scalar_t[(end - begin) * E] : nullptr);
    if (pre != nullptr) {
      gemm_rows_detail::gemm_nn<scalar_t>(dbc + begin * (R + 2 * N), R + 2 * N, w.dt_wt, E, w.dt_bias, pre.get(), E,
                                          end - begin, E, R);
    }
    for (int64_t b = begin; b < end; ++b) {
      const int64_t k = b - (Bsz - warm_rows);
      const char* warm = k >= 0 ? static_cast<const char*>(w.next_w) + k * E * 64 : nullptr;
      const MambaRow<scalar_t> row{xz + b * 2 * E + E, u + b * E, dbc + b * (R + 2 * N),
                                   pre != nullptr ? pre.get() + (b - begin) * E : nullptr, ssm_state + b * E * N,
                                   y + b * E, warm};
      row_fn(row, w, scratch.data());
    }
  });
}

}  // namespace hybridssm::step
