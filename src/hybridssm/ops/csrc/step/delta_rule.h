// DeltaNet and Gated DeltaNet (mixers/delta_net.py), one frame, kinds "delta_net" and "gated_delta_net":
//
//   [q, k, v, b (, a, z)] = W_in x                                   one projection, split
//   q, k, v = silu(conv_c(q)), silu(conv_c(k)), silu(conv_c(v));  q, k = q / |q|, k / |k|  per head
//   beta = sigmoid(b) (2 sigmoid(b) with allow_neg_eigval);   alpha = exp(-exp(A_log) softplus(a + dt_bias))
//   u = beta (v - alpha S^T k);   S = alpha S + k u^T;   o = S^T q * scale       per head (alpha = 1 ungated)
//   y = W_o (RMSNorm_Vh(o) * w_norm (* silu(z) gated))
//
// Weights (DeltaNetStepWeights): in_proj.weight [P, d], conv_weight [2HK + HVh, c], A_log [H] and
// dt_bias [H] (absent when ungated), o_norm.weight [Vh], o_proj.weight [d, H Vh]; P = 2HK + HVh + H,
// plus H + HVh when gated. Ints: (H, K, Vh, allow_neg_eigval). Floats: (q/k norm eps, o_norm eps, scale).
// States (DeltaNetState): conv_q [B, HK, c-1], conv_k [B, HK, c-1], conv_v [B, HVh, c-1], S [B, H, K, Vh].
#pragma once

#include "common.h"
#include "conv_silu.h"
#include "prefetch.h"
#include "scratch.h"

namespace hybridssm::step {

// One column block of NV vectors, columns [c0, c0 + NV W) of one head's state S [K, Vh] (the last
// vector holds `last` columns), in two passes over the block while it stays in L1:
//   pass 1  kS = S^T k over the old state (NV independent FMA chains, in registers);
//           u = beta (v - alpha kS)
//   pass 2  S = alpha S + k u^T, and o = S^T q over the new state as it is written
// A column's u needs only that column of S^T k, so each block is finished before the next is read:
// the state is read from memory once and written once per step. With the widest block (kBlock
// vectors) covering a whole row of the usual heads, a head's state is read as one sequential stream:
// measured at a plain read-and-write pass's rate at 64 streams, where column strips of half a row
// (every other 128 bytes) ran 1.35x slower. `next` (or null): the state the caller reads after this
// one, fetched into the cache row by row during pass 1 (the states of a layer at many streams are far
// beyond L2: without it every block waits on memory).
template <typename scalar_t, bool kGated, int NV>
inline void delta_block(scalar_t* S, const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t beta,
                        scalar_t alpha, scalar_t* o, int64_t K, int64_t Vh, int64_t c0, int64_t last,
                        const scalar_t* next) {
  using Vec = Vectorized<scalar_t>;
  using hybridssm::load;
  using hybridssm::store;
  constexpr int64_t W = Vec::size();
  int64_t cnt[NV];
  for (int i = 0; i < NV; ++i) cnt[i] = i + 1 < NV ? W : last;
  Vec acc[NV];
  for (int i = 0; i < NV; ++i) acc[i] = Vec(0);
  for (int64_t j = 0; j < K; ++j) {
    const Vec kj(k[j]);
    const scalar_t* r = S + j * Vh + c0;
    if (next != nullptr) prefetch_span(next + j * Vh, Vh);
    for (int i = 0; i < NV; ++i) acc[i] = at::vec::fmadd(kj, load(r + i * W, cnt[i]), acc[i]);
  }
  // u in L1 (not registers): pass 2 holds NV output accumulators instead
  alignas(64) scalar_t u[NV * W];
  const Vec a(alpha), bt(beta);
  for (int i = 0; i < NV; ++i) {
    const Vec kS = kGated ? a * acc[i] : acc[i];
    (bt * (load(v + c0 + i * W, cnt[i]) - kS)).store(u + i * W);
    acc[i] = Vec(0);
  }
  for (int64_t j = 0; j < K; ++j) {
    const Vec kj(k[j]), qj(q[j]);
    scalar_t* r = S + j * Vh + c0;
    for (int i = 0; i < NV; ++i) {
      const Vec s = load(r + i * W, cnt[i]);
      const Vec sn = at::vec::fmadd(kj, Vec::loadu(u + i * W), kGated ? a * s : s);
      store(sn, r + i * W, cnt[i]);
      acc[i] = at::vec::fmadd(qj, sn, acc[i]);
    }
  }
  for (int i = 0; i < NV; ++i) store(acc[i], o + c0 + i * W, cnt[i]);
}

// The last block of a head, nv <= N vectors wide: one instantiation per width, since the
// accumulators must be a compile-time count to stay in registers.
template <typename scalar_t, bool kGated, int N>
inline void delta_rest(int64_t nv, scalar_t* S, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                       scalar_t beta, scalar_t alpha, scalar_t* o, int64_t K, int64_t Vh, int64_t c0,
                       int64_t last, const scalar_t* next) {
  if (nv == N) return delta_block<scalar_t, kGated, N>(S, q, k, v, beta, alpha, o, K, Vh, c0, last, next);
  if constexpr (N > 1) {
    delta_rest<scalar_t, kGated, N - 1>(nv, S, q, k, v, beta, alpha, o, K, Vh, c0, last, next);
  }
}

// One head of one row: o = S_new^T q (unscaled) into o [Vh], the state S [K, Vh] updated in place,
// block by block (delta_block): kBlock vectors wide where they fit (kBlock accumulators, two
// broadcasts and the decay in registers; 64 float columns with AVX2), then one narrower block for
// the remaining columns. `next`: the state [K, Vh] the caller updates next (null for the last),
// prefetched during the first block.
template <typename scalar_t, bool kGated>
inline void delta_head(scalar_t* S, const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t beta,
                       scalar_t alpha, scalar_t* o, int64_t K, int64_t Vh, const scalar_t* next) {
  constexpr int64_t W = Vectorized<scalar_t>::size();
  constexpr int kBlock = 8;
  int64_t c0 = 0;
  for (; c0 + kBlock * W <= Vh; c0 += kBlock * W, next = nullptr) {
    delta_block<scalar_t, kGated, kBlock>(S, q, k, v, beta, alpha, o, K, Vh, c0, W, next);
  }
  const int64_t rest = Vh - c0;
  if (rest == 0) return;
  const int64_t nv = (rest + W - 1) / W, last = rest - (nv - 1) * W;
  delta_rest<scalar_t, kGated, kBlock>(nv, S, q, k, v, beta, alpha, o, K, Vh, c0, last, next);
}

// Measured and not kept (one thread, B = 64, in-process A/B at load 3-4; the products and the state
// pass did not overlap here): the next rows' in_proj and the previous rows' o_proj run in pieces
// from inside the state pass, rows in blocks of 12-48, were within noise of one after the other,
// 10-20% slower with pieces of 3-6 rows; head-major blocks of 12 rows, their states prefetched from
// inside the head's in_proj, 5-10% slower. Pass 1's accumulators live on the stack (the prefetch's
// test and inner loop make the compiler spill them); kept in registers it measured the same at
// B = 8, 16 and 64: the pass waits on the states' cache lines, not on the FMAs.
template <bool kGated>
at::Tensor delta_rule_step(const at::Tensor& x, const MixerSpec& m, at::Tensor* states, const at::Tensor&) {
  constexpr const char* kind = kGated ? "gated_delta_net" : "delta_net";
  check_compute_dtype(kind, x);
  check_spec(kind, m, 6, 4, 3);
  const auto dt = x.scalar_type();
  const int64_t B = x.size(0), d = x.size(1);
  const int64_t H = m.i[0], K = m.i[1], Vh = m.i[2];
  const bool neg_eigval = m.i[3] != 0;
  TORCH_CHECK(H >= 1 && K >= 1 && Vh >= 1, "hybridssm step (", kind, "): heads ", H, ", head_dim ", K,
              " and value width ", Vh, " must be positive");
  TORCH_CHECK(m.w[1].dim() == 2, "hybridssm step (", kind, "): conv_weight must be 2-D, got ",
              m.w[1].sizes());
  const int64_t HK = H * K, HV = H * Vh, C = 2 * HK + HV, c = m.w[1].size(1);
  const int64_t P = C + H + (kGated ? H + HV : 0);
  const auto Win = weight(kind, m, 0, "in_proj.weight", {P, d}, dt);
  const auto cw = weight(kind, m, 1, "conv_weight", {C, c}, dt);
  TORCH_CHECK(c >= 1, "hybridssm step (", kind, "): conv_weight must have at least one tap");
  TORCH_CHECK(kGated == present(m.w[2]) && kGated == present(m.w[3]), "hybridssm step (", kind,
              "): A_log and dt_bias must be given exactly when the mixer is gated");
  at::Tensor A_log, dt_bias;
  if (kGated) {
    A_log = weight(kind, m, 2, "A_log", {H}, dt);
    dt_bias = weight(kind, m, 3, "dt_bias", {H}, dt);
  }
  const auto wn = weight(kind, m, 4, "o_norm.weight", {Vh}, dt);
  const auto Wo = weight(kind, m, 5, "o_proj.weight", {d, HV}, dt);
  check_state(kind, "conv_q", states[0], {B, HK, c - 1}, dt);
  check_state(kind, "conv_k", states[1], {B, HK, c - 1}, dt);
  check_state(kind, "conv_v", states[2], {B, HV, c - 1}, dt);
  check_state(kind, "S", states[3], {B, H, K, Vh}, dt);
  const double qk_eps = m.f[0], o_eps = m.f[1], scale = m.f[2];

  // the output is the one tensor; the projection, the conv outputs and the normed (and gated) heads,
  // the o_proj's input, live in scratch memory (scratch.h)
  auto y = at::empty({B, Wo.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "delta_rule_step", [&] {
    using Vec = Vectorized<scalar_t>;
    using hybridssm::load;
    using hybridssm::store;
    Scratch scratch;
    scalar_t* proj0 = scratch.take<scalar_t>(B * P);  // [B, P]
    scalar_t* o0 = scratch.take<scalar_t>(B * HV);
    scalar_t* qkv_p = scratch.take<scalar_t>(C);
    linear_into(x.data_ptr<scalar_t>(), d, B, d, Win, at::Tensor(), proj0);
    // raw pointers taken once (data_ptr checks the tensor on every call)
    const scalar_t* w = cw.data_ptr<scalar_t>();
    const bool taps = B >= kConvTapsRows && conv_vector_path<scalar_t>(c);
    const std::vector<scalar_t> wt = taps ? conv_taps(w, C, c) : std::vector<scalar_t>();
    const scalar_t* wn0 = wn.data_ptr<scalar_t>();
    const scalar_t* A_log0 = kGated ? A_log.data_ptr<scalar_t>() : nullptr;
    const scalar_t* dt_bias0 = kGated ? dt_bias.data_ptr<scalar_t>() : nullptr;
    scalar_t* const conv0[3] = {states[0].data_ptr<scalar_t>(), states[1].data_ptr<scalar_t>(),
                                states[2].data_ptr<scalar_t>()};
    scalar_t* S0 = states[3].data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t* pb = proj0 + b * P;
      // the three convs, each over its own state, with SiLU
      const int64_t offs[3] = {0, HK, 2 * HK}, widths[3] = {HK, HK, HV};
      for (int f = 0; f < 3; ++f) {
        scalar_t* st = conv0[f] + b * widths[f] * (c - 1);
        conv_silu_step(pb + offs[f], st, wt.empty() ? nullptr : wt.data() + offs[f], C, w + offs[f] * c,
                       qkv_p + offs[f], widths[f], c);
      }
      scalar_t* ob = o0 + b * HV;
      for (int64_t h = 0; h < H; ++h) {
        scalar_t *q = qkv_p + h * K, *k = qkv_p + HK + h * K;
        const scalar_t* v = qkv_p + 2 * HK + h * Vh;
        for (scalar_t* t : {q, k}) {  // x / sqrt(|x|^2 + eps)
          const Vec inv(scalar_t(1) / std::sqrt(dot(t, t, K) + scalar_t(qk_eps)));
          vec_chunks<scalar_t>(K, [&](int64_t i, int64_t cnt) { store(load(t + i, cnt) * inv, t + i, cnt); });
        }
        scalar_t beta = scalar_t(1) / (scalar_t(1) + std::exp(-pb[C + h]));
        if (neg_eigval) beta = scalar_t(2) * beta;
        scalar_t alpha = 1;
        if (kGated) {
          const scalar_t z = pb[C + H + h] + dt_bias0[h];
          const scalar_t sp = z > scalar_t(20) ? z : std::log1p(std::exp(z));
          alpha = std::exp(-std::exp(A_log0[h]) * sp);
        }
        const int64_t bh = b * H + h;
        delta_head<scalar_t, kGated>(S0 + bh * K * Vh, q, k, v, beta, alpha, ob + h * Vh, K, Vh,
                                     bh + 1 < B * H ? S0 + (bh + 1) * K * Vh : nullptr);
        scalar_t* oh = ob + h * Vh;
        // o * scale, RMSNorm over the head (weights shared by heads), then the output gate
        const Vec sc = Vec(static_cast<scalar_t>(scale));
        vec_chunks<scalar_t>(Vh, [&](int64_t i, int64_t cnt) { store(load(oh + i, cnt) * sc, oh + i, cnt); });
        const Vec inv(scalar_t(1) / std::sqrt(dot(oh, oh, Vh) / scalar_t(Vh) + scalar_t(o_eps)));
        const scalar_t* zg = kGated ? pb + C + 2 * H + h * Vh : nullptr;
        vec_chunks<scalar_t>(Vh, [&](int64_t i, int64_t cnt) {
          Vec r = load(oh + i, cnt) * inv * load(wn0 + i, cnt);
          if (kGated) {
            const Vec z = load(zg + i, cnt);
            r = r * (z / (Vec(1) + z.neg().exp()));
          }
          store(r, oh + i, cnt);
        });
      }
    }
    linear_into(o0, HV, B, HV, Wo, at::Tensor(), y.data_ptr<scalar_t>());
  });
  return y;
}

HYBRIDSSM_MIXER_STEP(delta_net, delta_rule_step<false>, 4);
HYBRIDSSM_MIXER_STEP(gated_delta_net, delta_rule_step<true>, 4);

}  // namespace hybridssm::step
