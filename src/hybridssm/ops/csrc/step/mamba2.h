// Mamba-2 mixer step (mixers/mamba2.py, Mamba2StepWeights): one frame, states in place.
//
//   w: in_w [E + C + H, d] (-> z, xBC, dt), conv_w [C, 1, K], conv_b [C] or empty, dt_bias [H],
//      A_log [H], D [H] or [E] (D_has_hdim), norm_w [E], out_w [d, E], in_b [E + C + H] or empty,
//      out_b [d] or empty (proj_bias)                       (C = E + 2GN, E = H P)
//   i: (H, P, G, N, norm_before_gate);  f: (norm_eps, dt_lo, dt_hi)
//   states: conv [B, C, K-1], ssm [B, H, P, N]
//
//   xBC = silu(conv([conv ; xBC]) + conv_b) -> x [H, P], B [G, N], C [G, N] (head h reads group h / (H/G))
//   dt = clamp(softplus(dt + dt_bias), dt_lo, dt_hi); s = exp(dt A) s + dt x B, A = -exp(A_log)
//   y = C . s + D x  (D per head, or per channel)
//   out = out_proj(rmsnorm_G(y * silu(z)) * norm_w)    (norm_before_gate: rmsnorm_G(y) * norm_w * silu(z))

#pragma once

#include "common.h"
#include "prefetch.h"
#include "scratch.h"
#include "state_width.h"

#include <limits>

namespace hybridssm::step {

// One head of one row: s = decay s + dt x B (per channel p, over the state dim N), then
// y = (C . s + D x) silu(z), a SIMD width of channels reduced at once (hsum_lanes); D is Dc[p] when
// Dc is given (D per channel), else Dh; without zh (norm_before_gate) the gate is left to the norm. NB > 0: N is NB
// SIMD vectors, and B and C stay in registers across the channels (loaded once per head, where the
// compiler would reload them after every store to the state, which may alias them); NB = 0: any N.
// `next` (or null): the state the caller updates next, prefetched a channel at a time (a layer's
// states are far beyond L2 at many streams).
template <typename scalar_t, int NB>
inline void mamba2_head(const scalar_t* xh, const scalar_t* zh, const scalar_t* Bn, const scalar_t* Cn,
                        scalar_t* sh, scalar_t decay_s, scalar_t dt, scalar_t Dh, const scalar_t* Dc, scalar_t* yh,
                        int64_t P, int64_t N, const scalar_t* next) {
  using Vec = Vectorized<scalar_t>;
  using hybridssm::load;
  using hybridssm::store;
  constexpr int64_t W = Vec::size();
  const Vec decay(decay_s);
  Vec Bv[NB > 0 ? NB : 1], Cv[NB > 0 ? NB : 1];
  for (int i = 0; i < NB; ++i) Bv[i] = Vec::loadu(Bn + i * W), Cv[i] = Vec::loadu(Cn + i * W);
  for (int64_t p0 = 0; p0 < P; p0 += W) {
    const int64_t np = std::min(W, P - p0);
    Vec acc[W];
    for (int64_t l = 0; l < W; ++l) {
      acc[l] = Vec(0);
      if (l >= np) continue;
      const Vec dx(dt * xh[p0 + l]);
      scalar_t* s = sh + (p0 + l) * N;
      if (next != nullptr) prefetch_span(next + (p0 + l) * N, N);
      if constexpr (NB > 0) {
        for (int i = 0; i < NB; ++i) {
          const Vec sn = at::vec::fmadd(decay, Vec::loadu(s + i * W), dx * Bv[i]);
          sn.store(s + i * W);
          acc[l] = at::vec::fmadd(sn, Cv[i], acc[l]);
        }
      } else {
        for (int64_t n0 = 0; n0 < N; n0 += W) {
          const int64_t cnt = std::min(W, N - n0);
          const Vec sn = at::vec::fmadd(decay, load(s + n0, cnt), dx * load(Bn + n0, cnt));
          store(sn, s + n0, cnt);
          acc[l] = at::vec::fmadd(sn, load(Cn + n0, cnt), acc[l]);
        }
      }
    }
    const Vec D = Dc != nullptr ? load(Dc + p0, np) : Vec(Dh);
    const Vec yv = hsum_lanes(acc) + D * load(xh + p0, np);
    store(zh != nullptr ? yv * silu(load(zh + p0, np)) : yv, yh + p0, np);
  }
}

// The options of the reference's Mamba2 beyond its defaults (mixers/mamba2.py).
template <typename scalar_t>
struct Mamba2Options {
  bool D_per_channel = false;     // D_has_hdim: D [E], else [H]
  bool norm_before_gate = false;  // rmsnorm(y) * silu(z), else rmsnorm(y * silu(z))
  bool clamp_dt = false;          // dt_limit other than (0, inf)
  scalar_t dt_lo = 0, dt_hi = 0;
};

// Per row: the conv and SiLU over xBC, then per head the state update, C . s (a SIMD width of head
// channels reduced at once, see hsum_lanes), the D skip and the gate, then the grouped RMSNorm.
template <typename scalar_t>
void mamba2_rows(const scalar_t* proj, scalar_t* conv_state, scalar_t* ssm_state, const scalar_t* conv_w,
                 const scalar_t* conv_b, const scalar_t* dt_bias, const scalar_t* A_log, const scalar_t* Dv,
                 const scalar_t* norm_w, scalar_t norm_eps, const Mamba2Options<scalar_t>& opt, scalar_t* out,
                 int64_t Bsz, int64_t H, int64_t P, int64_t G, int64_t N, int64_t K) {
  using Vec = Vectorized<scalar_t>;
  using hybridssm::load;
  using hybridssm::store;
  constexpr int64_t W = Vec::size();
  const int64_t E = H * P, C = E + 2 * G * N, row = E + C + H, heads_per_group = H / G, gw = E / G;
  // B and C in registers for N up to 4 SIMD vectors (the usual 16-64 state sizes in float)
  const auto head =
      with_state_vectors<scalar_t>(N, [](auto nb) { return &mamba2_head<scalar_t, decltype(nb)::value>; });
  at::parallel_for(0, Bsz, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;  // this thread's
    scalar_t* xbc = scratch.take<scalar_t>(C);
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* z = proj + b * row;
      const scalar_t* xin = z + E;
      const scalar_t* dtr = xin + C;
      depthwise_conv_step(xin, conv_state + b * C * (K - 1), conv_w, conv_b, xbc, C, K);
      silu_inplace(xbc, C);
      const scalar_t* xs = xbc;
      scalar_t* y = out + b * E;
      for (int64_t h = 0; h < H; ++h) {
        scalar_t dt = dtr[h] + dt_bias[h];
        softplus_inplace(&dt, 1);
        if (opt.clamp_dt) dt = std::min(std::max(dt, opt.dt_lo), opt.dt_hi);  // torch.clamp's order
        const scalar_t A = -std::exp(A_log[h]);
        const int64_t g = h / heads_per_group;
        const scalar_t* Bn = xs + E + g * N;
        const int64_t bh = b * H + h;
        head(xs + h * P, opt.norm_before_gate ? nullptr : z + h * P, Bn, Bn + G * N, ssm_state + bh * P * N,
             std::exp(dt * A), dt, opt.D_per_channel ? scalar_t(0) : Dv[h],
             opt.D_per_channel ? Dv + h * P : nullptr, y + h * P, P, N,
             bh + 1 < Bsz * H ? ssm_state + (bh + 1) * P * N : nullptr);
      }
      // gated RMSNorm per group of gw channels (the gate applied here after the norm when
      // norm_before_gate, as the forward's (g * w) * silu(z))
      for (int64_t g = 0; g < G; ++g) {
        scalar_t* v = y + g * gw;
        Vec sq(0);
        vec_chunks<scalar_t>(gw, [&](int64_t i, int64_t cnt) {
          const Vec a = load(v + i, cnt);
          sq = at::vec::fmadd(a, a, sq);
        });
        const Vec r(scalar_t(1) / std::sqrt(hybridssm::hsum(sq) / scalar_t(gw) + norm_eps));
        const scalar_t* zg = z + g * gw;
        vec_chunks<scalar_t>(gw, [&](int64_t i, int64_t cnt) {
          const Vec n = load(v + i, cnt) * r * load(norm_w + g * gw + i, cnt);
          store(opt.norm_before_gate ? n * silu(load(zg + i, cnt)) : n, v + i, cnt);
        });
      }
    }
  });
}

inline at::Tensor mamba2_mixer_step(const at::Tensor& x, const MixerSpec& m, at::Tensor* states,
                                    const at::Tensor& /*pos*/) {
  TORCH_CHECK(m.w.size() == 10 && m.i.size() == 5 && m.f.size() == 3,
              "mamba2 step: expected 10 weights, 5 ints, 3 floats, got ", m.w.size(), ", ", m.i.size(), " and ",
              m.f.size());
  check_compute_dtype("mamba2", x);
  const auto dt = x.scalar_type();
  const int64_t H = m.i[0], P = m.i[1], G = m.i[2], N = m.i[3];
  const int64_t E = H * P, C = E + 2 * G * N, Bsz = x.size(0), K = m.w[1].size(-1), d = x.size(1);
  const at::Tensor& conv = states[0];
  const at::Tensor& ssm = states[1];
  TORCH_CHECK(G > 0 && H % G == 0 && E % G == 0 && m.w[0].dim() == 2 && m.w[0].size(0) == E + C + H &&
                  m.w[1].numel() == C * K && m.w[3].numel() == H && m.w[4].numel() == H &&
                  (m.w[5].numel() == H || m.w[5].numel() == E) && m.w[6].numel() == E && m.w[7].dim() == 2 &&
                  m.w[7].size(1) == E && (!present(m.w[8]) || m.w[8].numel() == E + C + H) &&
                  (!present(m.w[9]) || m.w[9].numel() == m.w[7].size(0)) && m.w[0].size(1) == d,
              "mamba2 step: weights do not fit (H=", H, ", P=", P, ", G=", G, ", N=", N, ")");
  TORCH_CHECK(m.f[1] >= 0 && m.f[1] < m.f[2], "mamba2 step: dt_limit must satisfy 0 <= lo < hi, got (", m.f[1],
              ", ", m.f[2], ")");
  TORCH_CHECK(conv.scalar_type() == dt && ssm.scalar_type() == dt, "mamba2 step: states must be in ", dt);
  TORCH_CHECK(conv.dim() == 3 && conv.size(0) == Bsz && conv.size(1) == C && conv.size(2) == K - 1 &&
                  ssm.dim() == 4 && ssm.size(0) == Bsz && ssm.size(1) == H && ssm.size(2) == P &&
                  ssm.size(3) == N,
              "mamba2 step: states ", conv.sizes(), ", ", ssm.sizes(), " do not fit the weights");
  const auto bias = [dt](const at::Tensor& b) { return present(b) ? as_(b, dt) : at::Tensor(); };
  const auto conv_w = as_(m.w[1], dt), dt_bias = as_(m.w[3], dt), A_log = as_(m.w[4], dt);
  const auto Dv = as_(m.w[5], dt), norm_w = as_(m.w[6], dt);
  const auto conv_b = opt(m.w[2], dt);
  const auto W_out = as_(m.w[7], dt);
  // the output is the one tensor; the projection and the gated heads live in scratch memory (scratch.h)
  auto out = at::empty({Bsz, W_out.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "mamba2_mixer_step", [&] {
    Mamba2Options<scalar_t> options;
    options.D_per_channel = Dv.numel() == E && E != H;
    options.norm_before_gate = m.i[4] != 0;
    options.clamp_dt = m.f[1] != 0.0 || m.f[2] != std::numeric_limits<double>::infinity();
    options.dt_lo = static_cast<scalar_t>(m.f[1]);
    options.dt_hi = static_cast<scalar_t>(m.f[2]);
    Scratch scratch;
    scalar_t* proj = scratch.take<scalar_t>(Bsz * (E + C + H));  // z, xBC, dt
    scalar_t* y = scratch.take<scalar_t>(Bsz * E);
    linear_into(x.data_ptr<scalar_t>(), d, Bsz, d, as_(m.w[0], dt), bias(m.w[8]), proj);
    mamba2_rows<scalar_t>(proj, conv.data_ptr<scalar_t>(), ssm.data_ptr<scalar_t>(), conv_w.data_ptr<scalar_t>(),
                          conv_b ? conv_b->data_ptr<scalar_t>() : nullptr, dt_bias.data_ptr<scalar_t>(),
                          A_log.data_ptr<scalar_t>(), Dv.data_ptr<scalar_t>(), norm_w.data_ptr<scalar_t>(),
                          static_cast<scalar_t>(m.f[0]), options, y, Bsz, H, P, G, N, K);
    linear_into(y, E, Bsz, E, W_out, bias(m.w[9]), out.data_ptr<scalar_t>());
  });
  return out;
}

HYBRIDSSM_MIXER_STEP(mamba2, mamba2_mixer_step, 2);

}  // namespace hybridssm::step
