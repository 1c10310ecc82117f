// One frame of a depthwise causal conv followed by SiLU, a SIMD width of channels at a time.
//
// depthwise_conv_step (common.h) walks the channels one by one: each channel's window [K-1] sits
// next to the next channel's in the state row [C, K-1], so a vector of channels is a strided read.
// At many streams that scalar loop cost as much as the delta rule's whole state pass per layer. For
// the usual 4-tap conv with AVX2 floats, 8 channels' windows (24 floats, 3 vectors) are split into
// one vector per tap with two blends and one lane permute each, the taps applied with FMAs, and the
// shifted windows written back the same way; the taps come transposed ([K, C], conv_taps) so that a
// vector of channels is one load. Other widths, dtypes and instruction sets take the scalar loop.
#pragma once

#include "common.h"

namespace hybridssm::step {

// wt [K, C] = w [C, K] transposed (once per call: a weight may change between calls). At one row
// the transposition costs about what the vector path saves: callers take it from kConvTapsRows rows.
template <typename scalar_t>
std::vector<scalar_t> conv_taps(const scalar_t* w, int64_t C, int64_t K) {
  return transposed(w, C, K);
}

inline constexpr int64_t kConvTapsRows = 4;

// Whether conv_silu_step has a vector path for this dtype and width (only then do the taps pay off).
template <typename scalar_t>
constexpr bool conv_vector_path(int64_t K) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
  return std::is_same_v<scalar_t, float> && K == 4;
#else
  return K < 0;  // never (K is used: no unused-parameter warning)
#endif
}

#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
namespace conv3_detail {

// 8 channels' windows of 3 floats, flat index f = 3 c + j (channel c, tap j), in 3 vectors of 8
// lanes: vector f / 8, lane f % 8. In lane l, the 3 vectors hold 3 different taps; tap j's vector
// there is src(j, l), the v with 8 v + l = j (mod 3).
constexpr int src(int j, int l) { return ((2 * (j - l)) % 3 + 3) % 3; }

struct Tables {
  int32_t pick[3][2][8];  // tap j: blend lanes from vector 1, then from vector 2
  int32_t gather[3][8];   // tap j: the blended lane holding channel c
  int32_t scatter[3][8];  // tap j: the channel that lane l of its blended vector holds
  int32_t place[3][2][8]; // vector v: lanes that take tap 1, then tap 2
};

constexpr Tables make_tables() {
  Tables t{};
  for (int j = 0; j < 3; ++j) {
    for (int l = 0; l < 8; ++l) {
      t.pick[j][0][l] = src(j, l) == 1 ? -1 : 0;
      t.pick[j][1][l] = src(j, l) == 2 ? -1 : 0;
      t.gather[j][l] = (3 * l + j) % 8;  // here l is the channel
      t.scatter[j][l] = (8 * src(j, l) + l - j) / 3;
      t.place[j][0][l] = (2 * j + l) % 3 == 1 ? -1 : 0;  // here j is the vector
      t.place[j][1][l] = (2 * j + l) % 3 == 2 ? -1 : 0;
    }
  }
  return t;
}

inline constexpr Tables kTables = make_tables();

inline __m256i lanes(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

inline __m256 blend3(__m256 a, __m256 b, __m256 c, const int32_t (*m)[8]) {
  return _mm256_blendv_ps(_mm256_blendv_ps(a, b, _mm256_castsi256_ps(lanes(m[0]))), c,
                          _mm256_castsi256_ps(lanes(m[1])));
}

// Channels [0, n) with n a multiple of 8: out = silu(bias + sum_j wt[j] win[j]) (bias: null for none),
// windows shifted by u.
inline void conv4_silu(const float* u, float* st, const float* wt, int64_t ldw, float* out, int64_t n,
                       const float* bias = nullptr) {
  const auto& T = kTables;
  for (int64_t c = 0; c < n; c += 8, st += 24) {
    const __m256 v0 = _mm256_loadu_ps(st), v1 = _mm256_loadu_ps(st + 8), v2 = _mm256_loadu_ps(st + 16);
    __m256 tap[3];
    for (int j = 0; j < 3; ++j) {
      tap[j] = _mm256_permutevar8x32_ps(blend3(v0, v1, v2, T.pick[j]), lanes(T.gather[j]));
    }
    const __m256 x = _mm256_loadu_ps(u + c);
    __m256 acc = bias != nullptr ? _mm256_fmadd_ps(_mm256_loadu_ps(wt + c), tap[0], _mm256_loadu_ps(bias + c))
                                 : _mm256_mul_ps(_mm256_loadu_ps(wt + c), tap[0]);
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(wt + ldw + c), tap[1], acc);
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(wt + 2 * ldw + c), tap[2], acc);
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(wt + 3 * ldw + c), x, acc);
    silu(Vectorized<float>(acc)).store(out + c);
    // the new windows: taps 1, 2 and u, back in the interleaved layout
    const __m256 next[3] = {tap[1], tap[2], x};
    __m256 back[3];
    for (int j = 0; j < 3; ++j) back[j] = _mm256_permutevar8x32_ps(next[j], lanes(T.scatter[j]));
    for (int v = 0; v < 3; ++v) _mm256_storeu_ps(st + 8 * v, blend3(back[0], back[1], back[2], T.place[v]));
  }
}

}  // namespace conv3_detail
#endif

// depthwise_conv_step's contract (channels [0, C) of one row, st [C, K-1] updated), then SiLU on
// out; w: the taps [C, K]; wt: the same from conv_taps, with the row stride ldw (its C, which may
// exceed this call's: the caller offsets wt to its first channel), or null for the scalar loop;
// bias [C] (offset as wt) or null for none.
template <typename scalar_t>
void conv_silu_step(const scalar_t* u, scalar_t* st, const scalar_t* wt, int64_t ldw, const scalar_t* w,
                    scalar_t* out, int64_t C, int64_t K, const scalar_t* bias = nullptr) {
  int64_t c0 = 0;
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (conv_vector_path<scalar_t>(K) && wt != nullptr) {
      c0 = C / 8 * 8;
      conv3_detail::conv4_silu(u, st, wt, ldw, out, c0, bias);
    }
  }
#endif
  depthwise_conv_step(u + c0, st + c0 * (K - 1), w + c0 * K, bias != nullptr ? bias + c0 : bias, out + c0, C - c0,
                      K);
  silu_inplace(out + c0, C - c0);
}

}  // namespace hybridssm::step
