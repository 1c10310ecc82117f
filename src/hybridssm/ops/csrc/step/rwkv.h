// An RWKV-6 layer (mixers/rwkv.py: its own norms, time-mix, channel-mix), one frame, kind "rwkv".
// The input is the raw residual stream x; the output is the layer's increment a + c (owns_norm):
//
//   h = LN_1(x);  xx = shift_time - h;  lora = tanh((h + xx mu_x) @ mix_down)           [B, 5R]
//   x_f = h + xx (mu_f + lora_f @ mix_up[f])               f in (w, k, v, r, g)
//   r, k, v = W_r x_r, W_k x_k, W_v x_v;   g = silu(W_g x_g)
//   e = exp(-exp(min(decay + tanh(x_w @ decay_down) @ decay_up, 30)))     per-channel decay
//   o = r^T (S + diag(u) k v^T);   S = diag(e) S + k v^T                  per head, one pass over S
//   a = W_o ((GroupNorm_H(o) ln_x_weight + ln_x_bias) * g)
//   c_in = LN_2(x + a);  xx' = shift_channel - c_in
//   c = sigmoid(C_r (c_in + xx' mu'_r)) * C_v relu(C_k (c_in + xx' mu'_k))^2;    returns a + c
//
// Weights (RWKVStepWeights): ln_time.{weight [D], bias [D] or absent}, mu_x, mu_w, mu_k, mu_v, mu_r,
// mu_g [D], mix_down [D, 5R], mix_up [5, R, D], decay [D], decay_down [D, Rd], decay_up [Rd, D],
// bonus [H, K], receptance, key, value, gate, output [D, D], ln_x_weight [D], ln_x_bias [D],
// ln_channel.{weight [D], bias [D] or absent}, channel mu_k, mu_r [D], channel key [F, D],
// receptance [D, D], value [D, F]; D = H K.
// Floats: ln_time eps, group-norm eps, ln_channel eps, the decay exponent's clamp.
// States (RWKVState): shift_time [B, D], wkv [B, H, K, K], shift_channel [B, D].
#pragma once

#include "common.h"
#include "glue.h"  // layer_norm_row: ATen's LayerNorm arithmetic, as the forward's
#include "scratch.h"

namespace hybridssm::step {

template <typename scalar_t>
void tanh_inplace(scalar_t* v, int64_t n) {
  vec_chunks<scalar_t>(n, [&](int64_t i, int64_t cnt) {
    hybridssm::store(hybridssm::load(v + i, cnt).tanh(), v + i, cnt);
  });
}

template <typename scalar_t>
inline const scalar_t* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t ? t->data_ptr<scalar_t>() : nullptr;
}

// One head's WKV over NQ vectors of the columns of its K x K state (S, v and out start at the first
// column; the last vector holds `tail` values): out = ruk v + sum_j r_j S[j], then
// S[j] <- e_j S[j] + k_j v. The output and v stay in registers over the K rows, so each state value
// is loaded and stored once (a loop over the whole row kept them in memory: 3 loads and 2 stores).
template <typename scalar_t, int NQ>
inline void wkv_columns(scalar_t* S, int64_t K, const scalar_t* r, const scalar_t* k, const scalar_t* e,
                        const scalar_t* v, scalar_t ruk, scalar_t* out, int64_t tail) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t L = Vec::size();
  auto cnt = [&](int q) { return q + 1 == NQ ? tail : L; };
  Vec acc[NQ], vv[NQ];
  for (int q = 0; q < NQ; ++q) {
    vv[q] = hybridssm::load(v + q * L, cnt(q));
    acc[q] = Vec(ruk) * vv[q];
  }
  for (int64_t j = 0; j < K; ++j) {
    const Vec rj(r[j]), ej(e[j]), kj(k[j]);
    scalar_t* Sj = S + j * K;
    for (int q = 0; q < NQ; ++q) {
      const Vec s = hybridssm::load(Sj + q * L, cnt(q));
      acc[q] = at::vec::fmadd(rj, s, acc[q]);
      hybridssm::store(at::vec::fmadd(ej, s, kj * vv[q]), Sj + q * L, cnt(q));
    }
  }
  for (int q = 0; q < NQ; ++q) hybridssm::store(acc[q], out + q * L, cnt(q));
}

// wkv_columns over all K columns, 4 vectors at a time (8 of the 16 registers for out and v).
template <typename scalar_t>
void wkv_head(scalar_t* S, int64_t K, const scalar_t* r, const scalar_t* k, const scalar_t* e,
              const scalar_t* v, scalar_t ruk, scalar_t* out) {
  constexpr int64_t L = Vectorized<scalar_t>::size();
  int64_t i = 0;
  for (; i + 4 * L <= K; i += 4 * L) wkv_columns<scalar_t, 4>(S + i, K, r, k, e, v + i, ruk, out + i, L);
  const int64_t rem = K - i, nq = (rem + L - 1) / L, tail = rem - (nq - 1) * L;
  switch (nq) {
    case 3: return wkv_columns<scalar_t, 3>(S + i, K, r, k, e, v + i, ruk, out + i, tail);
    case 2: return wkv_columns<scalar_t, 2>(S + i, K, r, k, e, v + i, ruk, out + i, tail);
    case 1: return wkv_columns<scalar_t, 1>(S + i, K, r, k, e, v + i, ruk, out + i, tail);
    default: return;
  }
}

// y [B, O] (rows O apart) = x [B, I] (rows ldx apart) @ W [I, O] (input-major, contiguous), written
// into y: vecmat_add per row for a small batch (after the first row the factor is in cache), a GEMM
// over views of the buffers for many rows (the values of matmul_small, without its tensors: at
// batch 1 a LoRA factor is a few microseconds of work and the tensors cost as much again).
template <typename scalar_t>
void input_major_rows(const scalar_t* x, int64_t ldx, const scalar_t* W, scalar_t* y, int64_t B, int64_t I,
                      int64_t O, const at::TensorOptions& opts) {
  if (B > 4) {
    auto yv = at::from_blob(y, {B, O}, opts);
    at::mm_out(yv, at::from_blob(const_cast<scalar_t*>(x), {B, I}, {ldx, 1}, opts),
               at::from_blob(const_cast<scalar_t*>(W), {I, O}, opts));
    return;
  }
  std::fill(y, y + B * O, scalar_t(0));
  for (int64_t b = 0; b < B; ++b) vecmat_add(x + b * ldx, W, y + b * O, I, O);
}

inline at::Tensor rwkv_step(const at::Tensor& x, const MixerSpec& m, at::Tensor* states, const at::Tensor&) {
  constexpr const char* kind = "rwkv";
  check_compute_dtype(kind, x);
  check_spec(kind, m, 28, 0, 4);
  const auto dt = x.scalar_type();
  const int64_t B = x.size(0), D = x.size(1);
  TORCH_CHECK(m.w[9].dim() == 3 && m.w[11].dim() == 2 && m.w[13].dim() == 2 && m.w[25].dim() == 2,
              "hybridssm step (rwkv): mix_up, decay_down, bonus and the channel key must be 3-D, 2-D, 2-D "
              "and 2-D, got ", m.w[9].sizes(), ", ", m.w[11].sizes(), ", ", m.w[13].sizes(), " and ",
              m.w[25].sizes());
  const int64_t R = m.w[9].size(1), Rd = m.w[11].size(1), H = m.w[13].size(0), K = m.w[13].size(1);
  const int64_t Fn = m.w[25].size(0);
  TORCH_CHECK(H * K == D, "hybridssm step (rwkv): bonus [", H, ", ", K, "] does not cover width ", D);
  const auto ln1_w = weight(kind, m, 0, "ln_time.weight", {D}, dt);
  const auto ln1_b = opt(m.w[1], dt);
  at::Tensor mu[6];  // mu_x, mu_w, mu_k, mu_v, mu_r, mu_g
  for (size_t f = 0; f < 6; ++f) mu[f] = weight(kind, m, 2 + f, "time-mix mu", {D}, dt);
  const auto mix_down = weight(kind, m, 8, "mix_down", {D, 5 * R}, dt);
  const auto mix_up = weight(kind, m, 9, "mix_up", {5, R, D}, dt);
  const auto decay = weight(kind, m, 10, "decay", {D}, dt);
  const auto decay_down = weight(kind, m, 11, "decay_down", {D, Rd}, dt);
  const auto decay_up = weight(kind, m, 12, "decay_up", {Rd, D}, dt);
  const auto bonus = weight(kind, m, 13, "bonus", {H, K}, dt);
  const auto Wr = weight(kind, m, 14, "receptance.weight", {D, D}, dt);
  const auto Wk = weight(kind, m, 15, "key.weight", {D, D}, dt);
  const auto Wv = weight(kind, m, 16, "value.weight", {D, D}, dt);
  const auto Wg = weight(kind, m, 17, "gate.weight", {D, D}, dt);
  const auto Wo = weight(kind, m, 18, "output.weight", {D, D}, dt);
  const auto lnx_w = weight(kind, m, 19, "ln_x_weight", {D}, dt);
  const auto lnx_b = weight(kind, m, 20, "ln_x_bias", {D}, dt);
  const auto ln2_w = weight(kind, m, 21, "ln_channel.weight", {D}, dt);
  const auto ln2_b = opt(m.w[22], dt);
  const auto cmu_k = weight(kind, m, 23, "channel mu_k", {D}, dt);
  const auto cmu_r = weight(kind, m, 24, "channel mu_r", {D}, dt);
  const auto Ck = weight(kind, m, 25, "channel key.weight", {Fn, D}, dt);
  const auto Cr = weight(kind, m, 26, "channel receptance.weight", {D, D}, dt);
  const auto Cv = weight(kind, m, 27, "channel value.weight", {D, Fn}, dt);
  TORCH_CHECK(!ln1_b || ln1_b->numel() == D, "hybridssm step (rwkv): ln_time.bias must have ", D,
              " values");
  TORCH_CHECK(!ln2_b || ln2_b->numel() == D, "hybridssm step (rwkv): ln_channel.bias must have ", D,
              " values");
  check_state(kind, "shift_time", states[0], {B, D}, dt);
  check_state(kind, "wkv", states[1], {B, H, K, K}, dt);
  check_state(kind, "shift_channel", states[2], {B, D}, dt);
  const double eps1 = m.f[0], eps_x = m.f[1], eps2 = m.f[2], max_exp = m.f[3];

  // the output is the one tensor; every intermediate lives in scratch memory (scratch.h)
  auto y = at::empty({B, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "rwkv_step", [&] {
    using Vec = Vectorized<scalar_t>;
    using hybridssm::load;
    using hybridssm::store;
    // data_ptr checks the tensor on every call: the loops below index raw pointers taken once
    auto p = [](const at::Tensor& t) { return t.data_ptr<scalar_t>(); };
    const scalar_t *mu_x = p(mu[0]), *decay_p = p(decay), *bonus_p = p(bonus), *lnx_wp = p(lnx_w);
    const scalar_t *lnx_bp = p(lnx_b), *cmu_kp = p(cmu_k), *cmu_rp = p(cmu_r);
    const scalar_t* x0 = p(x);
    scalar_t *shift_t = p(states[0]), *shift_c = p(states[2]);
    Scratch scratch;
    // x_w, x_k, x_v, x_r, x_g [5, B, D]; xx = shift - h and xxx (the LoRA's input), reused by the
    // channel-mix's x_k and x_r; h; the decay; the LoRA activations [B, 5R], [B, Rd];
    // r, k, v, g, the WKV output o, the time-mix's increment a [B, D]; the channel-mix's kk [B, F], rr
    scalar_t* xs = scratch.take<scalar_t>(5 * B * D);
    scalar_t* xx = scratch.take<scalar_t>(B * D);
    scalar_t* xxx = scratch.take<scalar_t>(B * D);
    scalar_t* h0 = scratch.take<scalar_t>(B * D);
    scalar_t* e0 = scratch.take<scalar_t>(B * D);
    scalar_t* lora0 = scratch.take<scalar_t>(B * 5 * R);
    scalar_t* dlo0 = scratch.take<scalar_t>(B * Rd);
    scalar_t* r0 = scratch.take<scalar_t>(B * D);
    scalar_t* k0 = scratch.take<scalar_t>(B * D);
    scalar_t* v0 = scratch.take<scalar_t>(B * D);
    scalar_t* g0 = scratch.take<scalar_t>(B * D);
    scalar_t* o0 = scratch.take<scalar_t>(B * D);
    scalar_t* a0 = scratch.take<scalar_t>(B * D);
    scalar_t* kk0 = scratch.take<scalar_t>(B * Fn);
    scalar_t* rr0 = scratch.take<scalar_t>(B * D);
    scalar_t* acc = scratch.take<scalar_t>(K);
    scalar_t* t = scratch.take<scalar_t>(D);
    scalar_t* c = scratch.take<scalar_t>(D);

    // token shift: h = LN_1(x), xx = shift - h, the LoRA's input h + xx mu_x; the shift takes h
    for (int64_t b = 0; b < B; ++b) {
      scalar_t *hb = h0 + b * D, *xxb = xx + b * D, *sb = shift_t + b * D, *ib = xxx + b * D;
      layer_norm_row(x0 + b * D, hb, D, p(ln1_w), ptr_or_null<scalar_t>(ln1_b), static_cast<scalar_t>(eps1));
      vec_chunks<scalar_t>(D, [&](int64_t i, int64_t cnt) {
        const Vec hv = load(hb + i, cnt), d = load(sb + i, cnt) - hv;
        store(d, xxb + i, cnt);
        store(hv + d * load(mu_x + i, cnt), ib + i, cnt);
        store(hv, sb + i, cnt);
      });
    }
    const auto opts = x.options();
    input_major_rows(xxx, D, p(mix_down), lora0, B, D, 5 * R, opts);  // [B, 5R]
    tanh_inplace(lora0, B * 5 * R);
    // x_f = h + xx (mu_f + lora_f @ mix_up[f]), the LoRA products first written into x_f: at a few
    // rows the five factors in one pass through mix_up (vecmat_blocks: one read-ahead stream), the
    // same values as a product per factor
    if (B <= 4) {
      for (int64_t b = 0; b < B; ++b) {
        vecmat_blocks<scalar_t>(lora0 + b * 5 * R, p(mix_up), nullptr, xs + b * D, B * D, 5, R, D);
      }
    } else {
      for (int64_t f = 0; f < 5; ++f) {
        input_major_rows(lora0 + f * R, 5 * R, p(mix_up) + f * R * D, xs + f * B * D, B, R, D, opts);
      }
    }
    for (int64_t f = 0; f < 5; ++f) {
      const scalar_t* mu_f = p(mu[1 + f]);
      for (int64_t b = 0; b < B; ++b) {
        const scalar_t *hb = h0 + b * D, *xxb = xx + b * D;
        scalar_t* ob = xs + (f * B + b) * D;
        vec_chunks<scalar_t>(D, [&](int64_t i, int64_t cnt) {
          const Vec mix = load(mu_f + i, cnt) + load(ob + i, cnt);
          store(load(hb + i, cnt) + load(xxb + i, cnt) * mix, ob + i, cnt);
        });
      }
    }
    const at::Tensor none;
    auto xf = [&](int64_t f) { return xs + f * B * D; };  // x_w, x_k, x_v, x_r, x_g
    linear_into(xf(3), D, B, D, Wr, none, r0);
    linear_into(xf(1), D, B, D, Wk, none, k0);
    linear_into(xf(2), D, B, D, Wv, none, v0);
    linear_into(xf(4), D, B, D, Wg, none, g0);
    silu_inplace(g0, B * D);
    input_major_rows(xf(0), D, p(decay_down), dlo0, B, D, Rd, opts);  // [B, Rd]
    tanh_inplace(dlo0, B * Rd);
    input_major_rows(dlo0, Rd, p(decay_up), e0, B, Rd, D, opts);  // [B, D], becomes exp(-exp(d))

    // WKV, per row and head, one pass over the state: o = r^T S + (r . (u * k)) v, then S <- e S + k v^T;
    // then the group norm with its affine, times the gate (into o)
    scalar_t* S0 = p(states[1]);
    for (int64_t b = 0; b < B; ++b) {
      scalar_t* eb = e0 + b * D;
      vec_chunks<scalar_t>(D, [&](int64_t i, int64_t cnt) {
        const Vec dd = at::vec::minimum(load(decay_p + i, cnt) + load(eb + i, cnt), Vec(scalar_t(max_exp)));
        store(dd.exp().neg().exp(), eb + i, cnt);
      });
      for (int64_t hh = 0; hh < H; ++hh) {
        const int64_t off = hh * K;
        const scalar_t *rh = r0 + b * D + off, *kh = k0 + b * D + off, *vh = v0 + b * D + off;
        const scalar_t *uh = bonus_p + off, *eh = eb + off;
        scalar_t* S = S0 + (b * H + hh) * K * K;
        scalar_t ruk = 0;
        for (int64_t j = 0; j < K; ++j) ruk += rh[j] * uh[j] * kh[j];
        wkv_head(S, K, rh, kh, eh, vh, ruk, acc);
        scalar_t* ob = o0 + b * D + off;
        layer_norm_row(acc, ob, K, lnx_wp + off, lnx_bp + off, static_cast<scalar_t>(eps_x));
        const scalar_t* gb = g0 + b * D + off;
        vec_chunks<scalar_t>(K, [&](int64_t i, int64_t cnt) {
          store(load(ob + i, cnt) * load(gb + i, cnt), ob + i, cnt);
        });
      }
    }
    linear_into(o0, D, B, D, Wo, none, a0);  // the time-mix's increment

    // channel-mix on c_in = LN_2(x + a), with its own token shift (xk, xr reuse xx and xxx)
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t *xb = x0 + b * D, *ab = a0 + b * D;
      vec_chunks<scalar_t>(D, [&](int64_t i, int64_t cnt) {
        store(load(xb + i, cnt) + load(ab + i, cnt), t + i, cnt);
      });
      layer_norm_row(t, c, D, p(ln2_w), ptr_or_null<scalar_t>(ln2_b), static_cast<scalar_t>(eps2));
      scalar_t *sb = shift_c + b * D, *kb = xx + b * D, *rb = xxx + b * D;
      vec_chunks<scalar_t>(D, [&](int64_t i, int64_t cnt) {
        const Vec cv = load(c + i, cnt), d = load(sb + i, cnt) - cv;
        store(cv + d * load(cmu_kp + i, cnt), kb + i, cnt);
        store(cv + d * load(cmu_rp + i, cnt), rb + i, cnt);
        store(cv, sb + i, cnt);
      });
    }
    linear_into(xx, D, B, D, Ck, none, kk0);  // [B, F]
    vec_chunks<scalar_t>(B * Fn, [&](int64_t i, int64_t cnt) {
      const Vec z = at::vec::maximum(load(kk0 + i, cnt), Vec(0));
      store(z * z, kk0 + i, cnt);
    });
    linear_into(xxx, D, B, D, Cr, none, rr0);
    scalar_t* y0 = p(y);
    linear_into(kk0, Fn, B, Fn, Cv, none, y0);  // becomes a + sigmoid(rr) * (C_v kk)
    vec_chunks<scalar_t>(B * D, [&](int64_t i, int64_t cnt) {
      store(load(a0 + i, cnt) + sigmoid(load(rr0 + i, cnt)) * load(y0 + i, cnt), y0 + i, cnt);
    });
  });
  return y;
}

HYBRIDSSM_MIXER_STEP(rwkv, rwkv_step, 3);

}  // namespace hybridssm::step
