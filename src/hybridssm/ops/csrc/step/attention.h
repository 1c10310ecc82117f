// The attention mixer's step (kind "attention"): one frame of mixers/attention.py's AttentionMixer,
// the same values as its forward at T = 1 with a state (ops/attention.py, attention_cached).
//
//   qkv = x @ Wqkv^T (+ b)             [B, (H + 2 Hkv) Dh]: q heads, then k heads, then v heads
//   q, k <- LayerNorm over Dh          (qk_layernorm; one norm for q, one for k, shared by the heads)
//   q, k <- RoPE at the row's position (rotate-half pairing (i, i + Dh/2); an odd last channel stays)
//   write k, v into the row's slot     (full cache: slot = position; window W: prefix slots, then a
//                                       ring of W slots; position p >= P lives in P + (p - P) % W)
//   out_h = softmax(scale * q_h . [memory keys, visible slots]) @ [memory values, visible values]
//   y = out @ Wo^T (+ b)               [B, d]
//
// Writing the new key first makes the visible keys a prefix of the buffer: slots [0, min(p + 1, N))
// for a row at position p (the filled part of a full cache, never its max_len; with a window, the
// prefix and every filled ring slot: the slot just overwritten held position p - W, the one key the
// window drops). Query head h reads kv head h / (H / Hkv) (grouped-query attention; Hkv = H is plain
// multi-head). Each row uses its own position, the state's pos (which counts prefix tokens).
//
// Weights (AttentionStepWeights in mixers/attention.py): qkv_weight, qkv_bias, o_weight, o_bias,
// q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, mem_k [M, Hkv, Dh], mem_v [M, Hkv, Dh].
// Ints: H, Hkv, Dh, window (0 = full cache), num_prefix, rope (0/1).
// Floats: softmax scale, rope base, q norm eps, k norm eps.
// States: k, v [B, Hkv, N, Dh] (N = P + S; S = W with a window), pos [B] int64 (advanced by one).

#pragma once

#include "common.h"
#include "prefetch.h"

#include <cmath>
#include <limits>
#include <mutex>
#include <tuple>

#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
#include <immintrin.h>
#endif

namespace hybridssm::step {
namespace attention_step {

enum Weight { kQkvW, kQkvB, kOW, kOB, kQNormW, kQNormB, kKNormW, kKNormB, kMemK, kMemV, kNumWeights };
enum Int { kHeads, kKvHeads, kHeadDim, kWindow, kPrefix, kRope, kNumInts };
enum Float { kScale, kRopeBase, kQNormEps, kKNormEps, kNumFloats };

// RoPE's inverse frequencies base^(-2i/Dh), computed by the same ATen ops as layers.rope_cos_sin so
// that every angle p * inv_freq[i] equals the forward's bit for bit (one ulp of inv_freq is ~1e-4 rad
// at position 4096). They depend on (Dh, base, dtype) only, never on a weight: kept per process.
inline at::Tensor rope_inv_freq(int64_t dim, double base, at::ScalarType dt) {
  static std::mutex mu;
  // never destroyed: tensors must not outlive torch's allocator at process exit
  static auto* table = new std::map<std::tuple<int64_t, double, int>, at::Tensor>();
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(dim, base, static_cast<int>(dt));
  auto it = table->find(key);
  if (it == table->end()) {
    const c10::InferenceMode no_autograd;
    const auto exponent = at::arange(dim / 2, at::TensorOptions().dtype(dt)).neg().mul(2.0).div(dim);
    it = table->emplace(key, at::pow(base, exponent).contiguous()).first;
  }
  return it->second;
}

// LayerNorm of one head vector of n values, in place: (x - mean) / sqrt(var + eps) * w + b.
template <typename scalar_t>
void layer_norm_inplace(scalar_t* x, int64_t n, const scalar_t* w, const scalar_t* b, double eps) {
  using Vec = Vectorized<scalar_t>;
  Vec acc(0);
  for (int64_t i = 0; i < n; i += Vec::size()) {
    acc = acc + hybridssm::load(x + i, std::min<int64_t>(Vec::size(), n - i));
  }
  const scalar_t mean = hybridssm::hsum(acc) / scalar_t(n);
  Vec sq(0);
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t cnt = std::min<int64_t>(Vec::size(), n - i);
    // the tail lanes load as 0; mask them so that (0 - mean)^2 does not count
    const Vec d = Vec::set(Vec(0), hybridssm::load(x + i, cnt) - Vec(mean), cnt);
    sq = at::vec::fmadd(d, d, sq);
  }
  const scalar_t rstd = scalar_t(1) / std::sqrt(hybridssm::hsum(sq) / scalar_t(n) + scalar_t(eps));
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t cnt = std::min<int64_t>(Vec::size(), n - i);
    Vec y = (hybridssm::load(x + i, cnt) - Vec(mean)) * Vec(rstd) * hybridssm::load(w + i, cnt);
    if (b != nullptr) y = y + hybridssm::load(b + i, cnt);
    hybridssm::store(y, x + i, cnt);
  }
}

// Rotate-half RoPE of one head vector in place: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s).
template <typename scalar_t>
void rope_inplace(scalar_t* x, const scalar_t* cos, const scalar_t* sin, int64_t half) {
  using Vec = Vectorized<scalar_t>;
  for (int64_t i = 0; i < half; i += Vec::size()) {
    const int64_t cnt = std::min<int64_t>(Vec::size(), half - i);
    const Vec x1 = hybridssm::load(x + i, cnt), x2 = hybridssm::load(x + half + i, cnt);
    const Vec c = hybridssm::load(cos + i, cnt), s = hybridssm::load(sin + i, cnt);
    hybridssm::store(x1 * c - x2 * s, x + i, cnt);
    hybridssm::store(x2 * c + x1 * s, x + half + i, cnt);
  }
}

// p[0..n) <- softmax(scale * s[0..n)) in place: exp(x - max) * (1 / sum), as torch's softmax.
template <typename scalar_t>
void scaled_softmax_inplace(scalar_t* s, int64_t n, scalar_t scale) {
  using Vec = Vectorized<scalar_t>;
  scalar_t mx = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    s[i] *= scale;
    mx = std::max(mx, s[i]);
  }
  Vec acc(0);
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t cnt = std::min<int64_t>(Vec::size(), n - i);
    const Vec e = Vec::set(Vec(0), (hybridssm::load(s + i, cnt) - Vec(mx)).exp(), cnt);
    hybridssm::store(e, s + i, cnt);
    acc = acc + e;
  }
  const scalar_t inv = scalar_t(1) / hybridssm::hsum(acc);
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t cnt = std::min<int64_t>(Vec::size(), n - i);
    hybridssm::store(hybridssm::load(s + i, cnt) * Vec(inv), s + i, cnt);
  }
}

// out[0..8) = the horizontal sums of acc[0..8): on AVX2 floats a transposing add tree (three rounds of
// hadd), else one sum per vector.
template <typename scalar_t>
inline void hsum8(const Vectorized<scalar_t>* acc, scalar_t* out) {
  for (int j = 0; j < 8; ++j) out[j] = hybridssm::hsum(acc[j]);
}

#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
template <>
inline void hsum8<float>(const Vectorized<float>* acc, float* out) {
  const __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]), t1 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]), t3 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // lanes: 4 half-sums each
  const __m256 lo = _mm256_permute2f128_ps(u0, u1, 0x20), hi = _mm256_permute2f128_ps(u0, u1, 0x31);
  _mm256_storeu_ps(out, _mm256_add_ps(lo, hi));
}
#endif

// the cache passes ask for the slots kAheadRows ahead of the one they read (prefetch_bytes)
constexpr int64_t kAheadRows = 16;

// s[r] = q . K[r] for the n rows of K (D values each, contiguous), eight rows per pass so that each load
// of q serves eight products and the eight sums reduce together; rows kAheadRows ahead are prefetched.
template <typename scalar_t>
void key_scores(const scalar_t* K, const scalar_t* q, int64_t n, int64_t D, scalar_t* s) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  int64_t r = 0;
  for (; r + 8 <= n; r += 8) {
    if (r + kAheadRows < n) {
      prefetch_bytes(K + (r + kAheadRows) * D, std::min<int64_t>(8, n - r - kAheadRows) * row_bytes);
    }
    Vec acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = Vec(0);
    const scalar_t* k = K + r * D;
    int64_t i = 0;
    for (; i + W <= D; i += W) {
      const Vec qv = Vec::loadu(q + i);
      for (int j = 0; j < 8; ++j) acc[j] = at::vec::fmadd(Vec::loadu(k + j * D + i), qv, acc[j]);
    }
    if (i < D) {
      const Vec qv = Vec::loadu(q + i, D - i);
      for (int j = 0; j < 8; ++j) acc[j] = at::vec::fmadd(Vec::loadu(k + j * D + i, D - i), qv, acc[j]);
    }
    hsum8(acc, s + r);
  }
  for (; r < n; ++r) {
    s[r] = dot(K + r * D, q, D);
  }
}

// One strip of NV vectors of weighted_sum's output (the last holds `tail` values): its accumulators
// are NV named registers over the n rows. NV is a compile-time width for every strip, the narrow last
// one included: an array indexed by a run-time count lives on the stack, and each row's FMAs then go
// through memory (a store-to-load chain per row).
template <typename scalar_t, int NV>
inline void weighted_strip(const scalar_t* p, const scalar_t* V, int64_t n, int64_t stride, scalar_t* out,
                           int64_t tail, bool accumulate, int64_t ahead_bytes) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  auto cnt = [&](int j) { return j + 1 == NV ? tail : W; };
  Vec acc[NV];
  for (int j = 0; j < NV; ++j) acc[j] = accumulate ? hybridssm::load(out + j * W, cnt(j)) : Vec(0);
  for (int64_t r = 0; r < n; ++r) {
    if (ahead_bytes > 0 && r + kAheadRows < n) prefetch_bytes(V + (r + kAheadRows) * stride, ahead_bytes);
    const Vec pr(p[r]);
    const scalar_t* v = V + r * stride;
    for (int j = 0; j < NV; ++j) acc[j] = at::vec::fmadd(pr, hybridssm::load(v + j * W, cnt(j)), acc[j]);
  }
  for (int j = 0; j < NV; ++j) hybridssm::store(acc[j], out + j * W, cnt(j));
}

// out[0..D) (+)= sum_r p[r] * V[r * stride + 0..D): strips of up to kStrip vectors of the output stay in
// registers while the rows of V stream through once. With `ahead`, the first strip's pass prefetches
// whole rows kAheadRows ahead (the cache's values; memory values stay in cache).
template <typename scalar_t>
void weighted_sum(const scalar_t* p, const scalar_t* V, int64_t n, int64_t stride, int64_t D, scalar_t* out,
                  bool accumulate, bool ahead = false) {
  constexpr int64_t W = Vectorized<scalar_t>::size();
  constexpr int kStrip = 8;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t c0 = 0; c0 < D; c0 += kStrip * W) {
    const int64_t width = std::min<int64_t>(D - c0, kStrip * W);
    const int nv = static_cast<int>((width + W - 1) / W);
    const int64_t tail = width - (nv - 1) * W;
    const int64_t pf = ahead && c0 == 0 ? row_bytes : 0;
    const scalar_t* v = V + c0;
    scalar_t* o = out + c0;
    switch (nv) {
      case 8: weighted_strip<scalar_t, 8>(p, v, n, stride, o, tail, accumulate, pf); break;
      case 7: weighted_strip<scalar_t, 7>(p, v, n, stride, o, tail, accumulate, pf); break;
      case 6: weighted_strip<scalar_t, 6>(p, v, n, stride, o, tail, accumulate, pf); break;
      case 5: weighted_strip<scalar_t, 5>(p, v, n, stride, o, tail, accumulate, pf); break;
      case 4: weighted_strip<scalar_t, 4>(p, v, n, stride, o, tail, accumulate, pf); break;
      case 3: weighted_strip<scalar_t, 3>(p, v, n, stride, o, tail, accumulate, pf); break;
      case 2: weighted_strip<scalar_t, 2>(p, v, n, stride, o, tail, accumulate, pf); break;
      default: weighted_strip<scalar_t, 1>(p, v, n, stride, o, tail, accumulate, pf); break;
    }
  }
}

template <typename scalar_t>
void attention_rows(const MixerSpec& m, at::Tensor& qkv, at::Tensor& ck, at::Tensor& cv, at::Tensor& pos,
                    at::Tensor& out) {
  const int64_t B = qkv.size(0), H = m.i[kHeads], Hkv = m.i[kKvHeads], D = m.i[kHeadDim];
  const int64_t N = ck.size(2), window = m.i[kWindow], P = m.i[kPrefix], half = D / 2;
  const int64_t group = H / Hkv, row = (H + 2 * Hkv) * D;
  const auto dt = qkv.scalar_type();
  const auto qn_w = opt(m.w[kQNormW], dt), qn_b = opt(m.w[kQNormB], dt);
  const auto kn_w = opt(m.w[kKNormW], dt), kn_b = opt(m.w[kKNormB], dt);
  const auto mem_k = opt(m.w[kMemK], dt), mem_v = opt(m.w[kMemV], dt);
  const int64_t M = mem_k ? mem_k->size(0) : 0;
  const bool rope = m.i[kRope] != 0 && half > 0;
  const at::Tensor inv_freq = rope ? rope_inv_freq(D, m.f[kRopeBase], dt) : at::Tensor();

  scalar_t* qkv_p = qkv.data_ptr<scalar_t>();
  scalar_t* ck_p = ck.data_ptr<scalar_t>();
  scalar_t* cv_p = cv.data_ptr<scalar_t>();
  int64_t* pos_p = pos.data_ptr<int64_t>();
  // Every row is checked before anything is written: a refused step changes nothing.
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(pos_p[b] >= 0 && (window > 0 || pos_p[b] < N), "attention step: row ", b,
                " is at position ", pos_p[b], ", outside the cache of ", N,
                " slots (the mixer checks max_len before stepping)");
  }
  const scalar_t* qn_wp = qn_w ? qn_w->data_ptr<scalar_t>() : nullptr;
  const scalar_t* qn_bp = qn_b ? qn_b->data_ptr<scalar_t>() : nullptr;
  const scalar_t* kn_wp = kn_w ? kn_w->data_ptr<scalar_t>() : nullptr;
  const scalar_t* kn_bp = kn_b ? kn_b->data_ptr<scalar_t>() : nullptr;
  const scalar_t* mk_p = mem_k ? mem_k->data_ptr<scalar_t>() : nullptr;
  const scalar_t* mv_p = mem_v ? mem_v->data_ptr<scalar_t>() : nullptr;
  const scalar_t* freq = rope ? inv_freq.data_ptr<scalar_t>() : nullptr;
  scalar_t* out_p = out.data_ptr<scalar_t>();
  const auto scale = static_cast<scalar_t>(m.f[kScale]);
  // the head of the next stream, before the hardware prefetcher can find it
  const int64_t ahead = std::min<int64_t>(N, kAheadRows) * D * static_cast<int64_t>(sizeof(scalar_t));

  // One task per (row, kv head): its new key and value into the cache, then for each of its query
  // heads the scores against memory + visible slots, softmax, weighted values. A pass over the keys
  // then one over the values, each read from memory once: the group's other query heads find them
  // in cache. The step is bound by reading the visible cache; while one stream is read, the start of
  // the next (this task's values, the next task's keys) is prefetched.
  int64_t widest = 0;
  for (int64_t b = 0; b < B; ++b) widest = std::max(widest, std::min(pos_p[b] + 1, N));
  const int64_t grain = std::max<int64_t>(1, 32768 / (group * (M + widest) * D));  // split only big work
  at::parallel_for(0, B * Hkv, grain, [&](int64_t begin, int64_t end) {
    // the group's scores; RoPE's cos and sin at the last row prepared
    std::vector<scalar_t> buf(group * (M + widest) + 2 * half);
    scalar_t* cos_p = buf.data() + group * (M + widest);
    scalar_t* sin_p = cos_p + half;
    int64_t rope_row = -1;
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / Hkv, g = bg % Hkv, p = pos_p[b];
      scalar_t* q = qkv_p + b * row + g * group * D;  // the group's query heads
      scalar_t* k = qkv_p + b * row + (H + g) * D;
      const scalar_t* v = qkv_p + b * row + (H + Hkv + g) * D;
      scalar_t* keys = ck_p + bg * N * D;
      scalar_t* vals = cv_p + bg * N * D;
      prefetch_bytes(vals, ahead);
      // 1. the new token: q/k norms, rotation at the row's position, key and value into the slot
      for (int64_t hh = 0; qn_wp != nullptr && hh < group; ++hh) {
        layer_norm_inplace(q + hh * D, D, qn_wp, qn_bp, m.f[kQNormEps]);
      }
      if (kn_wp != nullptr) layer_norm_inplace(k, D, kn_wp, kn_bp, m.f[kKNormEps]);
      if (rope) {
        if (rope_row != b) {
          using Vec = Vectorized<scalar_t>;
          for (int64_t i = 0; i < half; i += Vec::size()) {
            const int64_t cnt = std::min<int64_t>(Vec::size(), half - i);
            const Vec angle = Vec(static_cast<scalar_t>(p)) * hybridssm::load(freq + i, cnt);
            hybridssm::store(angle.cos(), cos_p + i, cnt);
            hybridssm::store(angle.sin(), sin_p + i, cnt);
          }
          rope_row = b;
        }
        for (int64_t hh = 0; hh < group; ++hh) rope_inplace(q + hh * D, cos_p, sin_p, half);
        rope_inplace(k, cos_p, sin_p, half);
      }
      const int64_t slot = window == 0 || p < P ? p : P + (p - P) % window;
      std::copy(k, k + D, keys + slot * D);
      std::copy(v, v + D, vals + slot * D);

      // 2. scores against memory keys (stride Hkv D between them) and the visible slots [0, n)
      const int64_t n = std::min(p + 1, N);
      for (int64_t hh = 0; hh < group; ++hh) {
        scalar_t* s = buf.data() + hh * (M + n);
        for (int64_t j = 0; j < M; ++j) s[j] = dot(q + hh * D, mk_p + (j * Hkv + g) * D, D);
        key_scores(keys, q + hh * D, n, D, s + M);
        scaled_softmax_inplace(s, M + n, scale);
      }
      if (bg + 1 < end) prefetch_bytes(keys + N * D, ahead);  // the next task's keys
      // 3. the weighted values
      for (int64_t hh = 0; hh < group; ++hh) {
        const scalar_t* s = buf.data() + hh * (M + n);
        scalar_t* o = out_p + b * H * D + (g * group + hh) * D;
        weighted_sum(s + M, vals, n, D, D, o, /*accumulate=*/false, /*ahead=*/hh == 0);
        if (M > 0) weighted_sum(s, mv_p + g * D, M, Hkv * D, D, o, /*accumulate=*/true);
      }
    }
  });
  for (int64_t b = 0; b < B; ++b) pos_p[b] += 1;
}

// Checks the options, the weights and the states of a batch of B rows in dtype dt.
inline void check_step(const MixerSpec& m, at::Tensor* states, int64_t B, at::ScalarType dt) {
  TORCH_CHECK(m.w.size() == kNumWeights && m.i.size() == kNumInts && m.f.size() == kNumFloats,
              "attention step: expected ", int(kNumWeights), " weights, ", int(kNumInts), " ints and ",
              int(kNumFloats), " floats, got ", m.w.size(), ", ", m.i.size(), ", ", m.f.size());
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "attention step: x must be float32 or float64, got ",
              dt);
  const int64_t H = m.i[kHeads], Hkv = m.i[kKvHeads], D = m.i[kHeadDim];
  const int64_t window = m.i[kWindow], P = m.i[kPrefix];
  TORCH_CHECK(H >= 1 && D >= 1 && Hkv >= 1 && H % Hkv == 0 && window >= 0 && P >= 0,
              "attention step: bad options H=", H, " Hkv=", Hkv, " Dh=", D, " window=", window, " P=", P);
  at::Tensor& ck = states[0];
  at::Tensor& cv = states[1];
  at::Tensor& pos = states[2];
  TORCH_CHECK(ck.dim() == 4 && ck.size(0) == B && ck.size(1) == Hkv && ck.size(3) == D &&
                  ck.sizes() == cv.sizes(),
              "attention step: caches k ", ck.sizes(), " and v ", cv.sizes(), " must both be [", B, ", ",
              Hkv, ", slots, ", D, "]");
  TORCH_CHECK(ck.scalar_type() == dt && cv.scalar_type() == dt, "attention step: caches must be ", dt);
  TORCH_CHECK(window == 0 ? ck.size(2) > P : ck.size(2) == P + window, "attention step: ", ck.size(2),
              " cache slots do not fit num_prefix=", P, window ? " + window=" : " + max_len >= 1",
              window ? std::to_string(window) : "");
  TORCH_CHECK(pos.dim() == 1 && pos.size(0) == B && pos.scalar_type() == at::kLong,
              "attention step: state pos must be int64 [", B, "], got ", pos.sizes());
  const auto& Wqkv = m.w[kQkvW];
  const auto& Wo = m.w[kOW];
  TORCH_CHECK(Wqkv.dim() == 2 && Wqkv.size(0) == (H + 2 * Hkv) * D, "attention step: qkv weight ",
              Wqkv.sizes(), " must have (H + 2 Hkv) Dh = ", (H + 2 * Hkv) * D, " rows");
  TORCH_CHECK(Wo.dim() == 2 && Wo.size(1) == H * D, "attention step: output weight ", Wo.sizes(),
              " must have H Dh = ", H * D, " columns");
  for (int w : {kQNormW, kQNormB, kKNormW, kKNormB}) {
    TORCH_CHECK(!present(m.w[w]) || m.w[w].numel() == D, "attention step: qk norm parameter of ",
                m.w[w].numel(), " values, expected Dh = ", D);
  }
  TORCH_CHECK(present(m.w[kMemK]) == present(m.w[kMemV]),
              "attention step: memory keys and values go together");
  if (present(m.w[kMemK])) {
    const auto& mk = m.w[kMemK];
    TORCH_CHECK(mk.dim() == 3 && mk.size(1) == Hkv && mk.size(2) == D &&
                    mk.sizes() == m.w[kMemV].sizes(),
                "attention step: memory keys ", mk.sizes(), " and values ", m.w[kMemV].sizes(),
                " must both be [M, ", Hkv, ", ", D, "]");
  }
}

inline at::Tensor attention_mixer_step(const at::Tensor& x, const MixerSpec& m, at::Tensor* states,
                                       const at::Tensor& /*pos: the state's own pos is the position*/) {
  const auto dt = x.scalar_type();
  check_step(m, states, x.size(0), dt);
  const int64_t B = x.size(0), H = m.i[kHeads], D = m.i[kHeadDim];
  at::Tensor& ck = states[0];
  at::Tensor& cv = states[1];
  at::Tensor& pos = states[2];
  const auto Wqkv = as_(m.w[kQkvW], dt), Wo = as_(m.w[kOW], dt);
  auto qkv = linear_small(x, Wqkv, opt(m.w[kQkvB], dt).value_or(at::Tensor()));  // [B, (H + 2 Hkv) Dh]
  auto out = at::empty({B, H * D}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "attention_step",
                             [&] { attention_rows<scalar_t>(m, qkv, ck, cv, pos, out); });
  return linear_small(out, Wo, opt(m.w[kOB], dt).value_or(at::Tensor()));
}

}  // namespace attention_step

HYBRIDSSM_MIXER_STEP(attention, attention_step::attention_mixer_step, 3);

}  // namespace hybridssm::step
