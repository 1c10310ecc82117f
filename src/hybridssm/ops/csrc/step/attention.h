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
//
// Speed (B = 64, 4 heads of 64, spans 60-85, 1 thread, benchmarks/bench_attention_step.py: the rate at
// which the pass reads the keys and values it attends, over the 128 MiB sum's rate in the same process;
// 2 shared cores, load 2-3.7, so each figure is a range over alternating runs):
//   one task at a time (keys, then values), every row prefetched 16 rows ahead     53-63%
//   the pipeline (a task's keys in the loop of the previous task's values)          67-70%
//   + the next turn's heads (32 lines) asked for after the pass, vector softmax max  66-84%
// Tried and not kept (a C++ model of the pass, /tmp-only, same access pattern): per-row prefetches
// (16, 32 or 64 rows ahead, any locality) are no faster than none and cost ~40% of the pass's rate
// on data in cache (a prefetch per line); a shadow stream prefetching the whole next task while this
// one is read (no faster: software prefetch alone sustains fewer misses than the hardware's streams);
// eight key rows beside the value strip (spills: slower than one stream); 16, 32 or 64 head lines
// (within noise). What is left: the softmax, the new token's norms, rotation and slot write run
// between passes, with only the heads in flight.

#pragma once

#include "common.h"
#include "prefetch.h"
#include "scratch.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
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
  const Vec lowest(-std::numeric_limits<scalar_t>::infinity());
  Vec top = lowest;
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t cnt = std::min<int64_t>(Vec::size(), n - i);
    const Vec x = hybridssm::load(s + i, cnt) * Vec(scale);
    hybridssm::store(x, s + i, cnt);
    top = at::vec::maximum(top, Vec::set(lowest, x, cnt));
  }
  alignas(64) scalar_t lanes[Vec::size()];
  top.store(lanes);
  const scalar_t mx = *std::max_element(lanes, lanes + Vec::size());
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

// out[0..4) = the horizontal sums of acc[0..4): on AVX2 floats a transposing add tree (two rounds of
// hadd, then the two 128-bit halves), else one sum per vector. Each sum is ((x0 + x1) + (x2 + x3)) +
// ((x4 + x5) + (x6 + x7)), the tree the eight-row form of this reduction used: a score has the same
// bits as before the key pass went four rows at a time.
template <typename scalar_t>
inline void hsum4(const Vectorized<scalar_t>* acc, scalar_t* out) {
  for (int j = 0; j < 4; ++j) out[j] = hybridssm::hsum(acc[j]);
}

#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
template <>
inline void hsum4<float>(const Vectorized<float>* acc, float* out) {
  const __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]), t1 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 u = _mm256_hadd_ps(t0, t1);  // lanes 0-3: each row's low half-sum, 4-7: its high one
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1)));
}
#endif

// s[0..4) = q . k[j * D, (j + 1) * D) for four rows: each load of q serves four products. Four rows,
// not eight: beside a value strip's 8 accumulators (keys_and_values) the 16 AVX2 registers hold 4
// more, and 8 would spill.
template <typename scalar_t>
inline void key_rows4(const scalar_t* k, const scalar_t* q, int64_t D, scalar_t* s) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  Vec acc[4];
  for (int j = 0; j < 4; ++j) acc[j] = Vec(0);
  int64_t i = 0;
  for (; i + W <= D; i += W) {
    const Vec qv = Vec::loadu(q + i);
    for (int j = 0; j < 4; ++j) acc[j] = at::vec::fmadd(Vec::loadu(k + j * D + i), qv, acc[j]);
  }
  if (i < D) {
    const Vec qv = Vec::loadu(q + i, D - i);
    for (int j = 0; j < 4; ++j) acc[j] = at::vec::fmadd(Vec::loadu(k + j * D + i, D - i), qv, acc[j]);
  }
  hsum4(acc, s);
}

// s[r] = q . K[r] for rows [r0, r1) of K (D values each, contiguous): rows below the last multiple of 8
// of the n rows four at a time (key_rows4), the rest one by one (dot), as the pass always split them.
template <typename scalar_t>
inline void key_range(const scalar_t* K, const scalar_t* q, int64_t n, int64_t r0, int64_t r1, int64_t D,
                      scalar_t* s) {
  const int64_t blocked = n / 8 * 8;
  int64_t r = r0;
  for (; r + 4 <= std::min(r1, blocked); r += 4) key_rows4(K + r * D, q, D, s + r);
  for (; r < r1; ++r) s[r] = dot(K + r * D, q, D);
}

// s[r] = q . K[r] for the n rows of K.
template <typename scalar_t>
void key_scores(const scalar_t* K, const scalar_t* q, int64_t n, int64_t D, scalar_t* s) {
  key_range(K, q, n, 0, n, D, s);
}

// Another task's key pass riding along a value strip (keys_and_values): s[r] = q . K[r] for its n rows.
template <typename scalar_t>
struct KeyStream {
  const scalar_t* K;
  const scalar_t* q;
  int64_t n;
  int64_t D;
  scalar_t* s;
};

// One strip of NV vectors of a weighted sum's output (the last holds `tail` values): its accumulators
// are NV named registers over the n rows. NV is a compile-time width for every strip, the narrow last
// one included: an array indexed by a run-time count lives on the stack, and each row's FMAs then go
// through memory (a store-to-load chain per row). With `keys`, that key pass runs in the same loop,
// four key rows beside four value rows per turn (while both have them), then its rest.
template <typename scalar_t, int NV>
inline void weighted_strip(const scalar_t* p, const scalar_t* V, int64_t n, int64_t stride, scalar_t* out,
                           int64_t tail, bool accumulate, const KeyStream<scalar_t>* keys = nullptr) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  auto cnt = [&](int j) { return j + 1 == NV ? tail : W; };
  Vec acc[NV];
  for (int j = 0; j < NV; ++j) acc[j] = accumulate ? hybridssm::load(out + j * W, cnt(j)) : Vec(0);
  auto add = [&](int64_t r) {
    const Vec pr(p[r]);
    const scalar_t* v = V + r * stride;
    for (int j = 0; j < NV; ++j) acc[j] = at::vec::fmadd(pr, hybridssm::load(v + j * W, cnt(j)), acc[j]);
  };
  // rows [0, both) of the keys go four at a time (key_range's blocked part, a multiple of 4)
  const int64_t both = keys != nullptr ? std::min(keys->n / 8 * 8, n / 4 * 4) : 0;
  int64_t r = 0;
  for (; r < both; r += 4) {
    key_rows4(keys->K + r * keys->D, keys->q, keys->D, keys->s + r);
    for (int i = 0; i < 4; ++i) add(r + i);
  }
  for (; r < n; ++r) add(r);
  for (int j = 0; j < NV; ++j) hybridssm::store(acc[j], out + j * W, cnt(j));
  if (keys != nullptr) key_range(keys->K, keys->q, keys->n, both, keys->n, keys->D, keys->s);
}

// Calls f(std::integral_constant<int, nv>) for a strip of nv = 1..8 vectors.
template <typename F>
inline void with_strip_width(int nv, F&& f) {
  switch (nv) {
    case 8: f(std::integral_constant<int, 8>()); break;
    case 7: f(std::integral_constant<int, 7>()); break;
    case 6: f(std::integral_constant<int, 6>()); break;
    case 5: f(std::integral_constant<int, 5>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    default: f(std::integral_constant<int, 1>()); break;
  }
}

// the widest value strip (vectors) kept in registers
constexpr int kStrip = 8;
// the fewest rows (B) that run the (row, kv head) tasks as a pipeline (attention_rows)
constexpr int64_t kPipelineMinRows = 4;
// cache lines asked for at the head of each stream a turn will read next (keys_and_values' pipeline)
constexpr int64_t kHeadLines = 32;

// out[0..D) (+)= sum_r p[r] * V[r * stride + 0..D): strips of up to kStrip vectors of the output stay in
// registers while the rows of V stream through once per strip.
template <typename scalar_t>
void weighted_sum(const scalar_t* p, const scalar_t* V, int64_t n, int64_t stride, int64_t D, scalar_t* out,
                  bool accumulate) {
  constexpr int64_t W = Vectorized<scalar_t>::size();
  for (int64_t c0 = 0; c0 < D; c0 += kStrip * W) {
    const int64_t width = std::min<int64_t>(D - c0, kStrip * W);
    const int nv = static_cast<int>((width + W - 1) / W);
    with_strip_width(nv, [&](auto NV) {
      weighted_strip<scalar_t, decltype(NV)::value>(p, V + c0, n, stride, out + c0, width - (nv - 1) * W,
                                                    accumulate);
    });
  }
}

// Whether a head of D values is one value strip: then keys_and_values reads two tasks' streams at once.
template <typename scalar_t>
constexpr bool one_strip(int64_t D) {
  return D <= kStrip * Vectorized<scalar_t>::size();
}

// One task's key scores (s[r] = q . K[r], r < nk) and another's weighted values (out = sum_r p[r] V[r],
// r < nv, D <= one strip): the same arithmetic as key_scores and weighted_sum, in one loop. The step is
// bound by reading the caches, and one core reads two streams faster than one after the other: each
// stream's hardware prefetch runs while the other's rows are computed.
template <typename scalar_t>
void keys_and_values(const scalar_t* K, const scalar_t* q, int64_t nk, scalar_t* s, const scalar_t* p,
                     const scalar_t* V, int64_t nv, int64_t D, scalar_t* out) {
  constexpr int64_t W = Vectorized<scalar_t>::size();
  const int nvec = static_cast<int>((D + W - 1) / W);
  const KeyStream<scalar_t> keys{K, q, nk, D, s};
  with_strip_width(nvec, [&](auto NV) {
    weighted_strip<scalar_t, decltype(NV)::value>(p, V, nv, D, out, D - (nvec - 1) * W, /*accumulate=*/false,
                                                  &keys);
  });
}

// The attention of B rows: qkv [B, (H + 2 Hkv) Dh] (contiguous; q and k normed and rotated in
// place) into out [B, H Dh], each row's key and value written into the caches and its position
// advanced.
template <typename scalar_t>
void attention_rows(const MixerSpec& m, scalar_t* qkv_p, int64_t B, at::Tensor& ck, at::Tensor& cv, at::Tensor& pos,
                    scalar_t* out_p) {
  const int64_t H = m.i[kHeads], Hkv = m.i[kKvHeads], D = m.i[kHeadDim];
  const int64_t N = ck.size(2), window = m.i[kWindow], P = m.i[kPrefix], half = D / 2;
  const int64_t group = H / Hkv, row = (H + 2 * Hkv) * D;
  const auto dt = ck.scalar_type();
  const auto qn_w = opt(m.w[kQNormW], dt), qn_b = opt(m.w[kQNormB], dt);
  const auto kn_w = opt(m.w[kKNormW], dt), kn_b = opt(m.w[kKNormB], dt);
  const auto mem_k = opt(m.w[kMemK], dt), mem_v = opt(m.w[kMemV], dt);
  const int64_t M = mem_k ? mem_k->size(0) : 0;
  const bool rope = m.i[kRope] != 0 && half > 0;
  const at::Tensor inv_freq = rope ? rope_inv_freq(D, m.f[kRopeBase], dt) : at::Tensor();

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
  const auto scale = static_cast<scalar_t>(m.f[kScale]);
  // The pipeline pays where the cache pass waits on memory (many streams); at a few rows (B <= 4, as
  // the step's GEMV route) the passes run one after the other: paired, transformer's batch-1 step
  // took 1.35x (bench_step.py --against, the same tree with and without the pipeline, 5 runs each).
  const bool paired = one_strip<scalar_t>(D) && B > kPipelineMinRows;
  const int64_t head_bytes = std::min<int64_t>(kHeadLines * 64, N * D * static_cast<int64_t>(sizeof(scalar_t)));

  // One task per (row, kv head): its new key and value into the cache, then for each of its query
  // heads the scores against memory + visible slots, softmax, weighted values. The keys are read from
  // memory once, then the values once: the group's other query heads find them in cache. The step is
  // bound by reading the visible cache, and a core reads two streams faster than one: so a thread's
  // tasks are a pipeline, each turn reading one task's keys together with the previous task's values
  // (keys_and_values; a head wider than a value strip reads them one after the other). Each turn asks
  // for the heads of the next turn's two streams, and for the next task's slots (written first thing
  // in the next turn: a store into a line not in cache waits for the line).
  int64_t widest = 0;
  for (int64_t b = 0; b < B; ++b) widest = std::max(widest, std::min(pos_p[b] + 1, N));
  const int64_t grain = std::max<int64_t>(1, 32768 / (group * (M + widest) * D));  // split only big work
  const int64_t scores = group * (M + widest);
  at::parallel_for(0, B * Hkv, grain, [&](int64_t begin, int64_t end) {
    // the scores of the group of the task in its key pass and of the one in its value pass; RoPE's
    // cos and sin at the last row prepared
    Scratch scratch;  // this thread's
    scalar_t* buf = scratch.take<scalar_t>(2 * scores + 2 * half);
    scalar_t* cos_p = buf + 2 * scores;
    scalar_t* sin_p = cos_p + half;
    int64_t rope_row = -1;
    struct Task {
      int64_t b, g, n;
      scalar_t* q;  // the group's query heads
      const scalar_t* keys;
      const scalar_t* vals;
      scalar_t* s;  // the group's scores, then weights: head hh's at hh * (M + n)
      scalar_t* o;  // the group's outputs: head hh's at hh * D
    };
    auto slot_of = [&](int64_t p) { return window == 0 || p < P ? p : P + (p - P) % window; };
    // 1. the new token: q/k norms, rotation at the row's position, key and value into the slot
    auto start = [&](int64_t bg, scalar_t* s) {
      const int64_t b = bg / Hkv, g = bg % Hkv, p = pos_p[b];
      scalar_t* q = qkv_p + b * row + g * group * D;
      scalar_t* k = qkv_p + b * row + (H + g) * D;
      const scalar_t* v = qkv_p + b * row + (H + Hkv + g) * D;
      scalar_t* keys = ck_p + bg * N * D;
      scalar_t* vals = cv_p + bg * N * D;
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
      const int64_t slot = slot_of(p);
      std::copy(k, k + D, keys + slot * D);
      std::copy(v, v + D, vals + slot * D);
      return Task{b, g, std::min(p + 1, N), q, keys, vals, s, out_p + b * H * D + g * group * D};
    };
    // 2. scores against memory keys (stride Hkv D between them) and the visible slots [0, n), then
    // softmax; head 0's slots are scored in its turn's pass
    auto finish_keys = [&](const Task& t) {
      for (int64_t hh = 0; hh < group; ++hh) {
        scalar_t* s = t.s + hh * (M + t.n);
        for (int64_t j = 0; j < M; ++j) s[j] = dot(t.q + hh * D, mk_p + (j * Hkv + t.g) * D, D);
        if (hh > 0) key_scores(t.keys, t.q + hh * D, t.n, D, s + M);
        scaled_softmax_inplace(s, M + t.n, scale);
      }
    };
    // 3. the weighted values and memory values; head 0's slot values are summed in its turn's pass
    auto finish_values = [&](const Task& t) {
      for (int64_t hh = 0; hh < group; ++hh) {
        const scalar_t* s = t.s + hh * (M + t.n);
        scalar_t* o = t.o + hh * D;
        if (hh > 0) weighted_sum(s + M, t.vals, t.n, D, D, o, /*accumulate=*/false);
        if (M > 0) weighted_sum(s, mv_p + t.g * D, M, Hkv * D, D, o, /*accumulate=*/true);
      }
    };
    auto head0_values = [&](const Task& t) {
      weighted_sum(t.s + M, t.vals, t.n, D, D, t.o, /*accumulate=*/false);
    };
    Task prev{};
    prefetch_bytes(ck_p + begin * N * D, head_bytes);
    for (int64_t bg = begin; bg < end; ++bg) {
      const Task t = start(bg, buf + ((bg - begin) % 2) * scores);
      if (bg == begin) {
        key_scores(t.keys, t.q, t.n, D, t.s + M);
      } else if (paired) {
        keys_and_values(t.keys, t.q, t.n, t.s + M, prev.s + M, prev.vals, prev.n, D, prev.o);
      } else {
        key_scores(t.keys, t.q, t.n, D, t.s + M);
        head0_values(prev);
      }
      // the next turn's streams, while this turn's softmax and the next task's start compute
      if (bg + 1 < end) {
        prefetch_bytes(t.keys + N * D, head_bytes);
        const int64_t next = slot_of(pos_p[(bg + 1) / Hkv]) * D;
        prefetch_span(t.keys + N * D + next, D);
        prefetch_span(t.vals + N * D + next, D);
      }
      prefetch_bytes(t.vals, head_bytes);
      finish_keys(t);
      if (bg > begin) finish_values(prev);
      prev = t;
    }
    if (end > begin) {
      head0_values(prev);
      finish_values(prev);
    }
  });
  for (int64_t b = 0; b < B; ++b) pos_p[b] += 1;
}

// attention_rows over tensors: qkv [B, (H + 2 Hkv) Dh] and out [B, H Dh], rows contiguous (prefill.h's
// frames and restarts).
template <typename scalar_t>
void attention_rows(const MixerSpec& m, at::Tensor& qkv, at::Tensor& ck, at::Tensor& cv, at::Tensor& pos,
                    at::Tensor& out) {
  TORCH_CHECK(qkv.is_contiguous() && out.is_contiguous() && qkv.size(0) == out.size(0),
              "attention step: qkv ", qkv.sizes(), " and out ", out.sizes(), " must be contiguous rows");
  attention_rows<scalar_t>(m, qkv.data_ptr<scalar_t>(), qkv.size(0), ck, cv, pos, out.data_ptr<scalar_t>());
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
  check_compute_dtype("attention", x);
  check_step(m, states, x.size(0), dt);
  const int64_t B = x.size(0), H = m.i[kHeads], D = m.i[kHeadDim];
  at::Tensor& ck = states[0];
  at::Tensor& cv = states[1];
  at::Tensor& pos = states[2];
  const int64_t Hkv = m.i[kKvHeads], d = x.size(1);
  const auto Wqkv = as_(m.w[kQkvW], dt), Wo = as_(m.w[kOW], dt);
  const auto bqkv = present(m.w[kQkvB]) ? as_(m.w[kQkvB], dt) : at::Tensor();
  const auto bo = present(m.w[kOB]) ? as_(m.w[kOB], dt) : at::Tensor();
  // the output is the one tensor: qkv and the heads' outputs live in scratch memory (scratch.h)
  auto y = at::empty({B, Wo.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "attention_step", [&] {
    Scratch scratch;
    scalar_t* qkv = scratch.take<scalar_t>(B * (H + 2 * Hkv) * D);  // [B, (H + 2 Hkv) Dh]
    scalar_t* out = scratch.take<scalar_t>(B * H * D);
    linear_into(x.data_ptr<scalar_t>(), d, B, d, Wqkv, bqkv, qkv);
    attention_rows<scalar_t>(m, qkv, B, ck, cv, pos, out);
    linear_into(out, H * D, B, H * D, Wo, bo, y.data_ptr<scalar_t>());
  });
  return y;
}

}  // namespace attention_step

HYBRIDSSM_MIXER_STEP(attention, attention_step::attention_mixer_step, 3);

}  // namespace hybridssm::step
