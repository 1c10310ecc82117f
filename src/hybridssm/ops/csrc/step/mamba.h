// Mamba-1 mixer step (mixers/mamba.py, MambaStepWeights): one frame, states in place.
//
//   w: in_w [2E, d], conv_w [E, 1, K] or [E, K], conv_b [E] or empty, xproj_w [R + 2N, E],
//      dt_w [E, R], dt_bias [E], A_log [E, N], D [E], out_w [d, E],
//      dt_norm_w [R], b_norm_w [N], c_norm_w [N] (all three or none: the inner norms), f = (eps)
//   states: conv [B, E, K-1], ssm [B, E, N]
//
//   xi, z = in_proj(x); u = silu(conv([conv ; xi]) + conv_b); dt, Bn, Cn = x_proj(u)
//   with inner norms (Jamba): dt, Bn, Cn = rms(dt) dt_norm_w, rms(Bn) b_norm_w, rms(Cn) c_norm_w
//   delta = softplus(dt_proj(dt) + dt_bias); h = exp(delta * A) h + delta u Bn, A = -exp(A_log)
//   y = out_proj((Cn . h + D u) * silu(z))
//
// A is computed from A_log on every call (nothing derived is kept), with the same vectorised exp as
// the forward's torch.exp; the decay uses the selective scan's exp (exp_u20 in fp32).

#pragma once

#include "common.h"

namespace hybridssm::step {

inline at::vec::Vectorized<float> scan_decay_exp(const at::vec::Vectorized<float>& x) { return x.exp_u20(); }
inline at::vec::Vectorized<double> scan_decay_exp(const at::vec::Vectorized<double>& x) { return x.exp(); }

// u [B, E] = silu(conv([conv_state ; xi]) + conv_b), xi the first half of each row of xz [B, 2E]; the
// conv windows shift in place
template <typename scalar_t>
void mamba_conv_rows(const scalar_t* xz, scalar_t* conv_state, const scalar_t* conv_w, const scalar_t* conv_b,
                     scalar_t* u, int64_t Bsz, int64_t E, int64_t K) {
  for (int64_t b = 0; b < Bsz; ++b) {
    depthwise_conv_step(xz + b * 2 * E, conv_state + b * E * (K - 1), conv_w, conv_b, u + b * E, E, K);
    silu_inplace(u + b * E, E);
  }
}

// RMSNorm in place of each row's d values at v + r * stride: v * rsqrt(mean(v^2) + eps) * w
template <typename scalar_t>
void rmsnorm_rows_inplace(scalar_t* v, int64_t rows, int64_t stride, int64_t d, const scalar_t* w, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* row = v + r * stride;
    scalar_t sq = 0;
    for (int64_t i = 0; i < d; ++i) sq += row[i] * row[i];
    const scalar_t s = scalar_t(1) / std::sqrt(sq / scalar_t(d) + static_cast<scalar_t>(eps));
    for (int64_t i = 0; i < d; ++i) row[i] = row[i] * s * w[i];
  }
}

// One row's state update and gated output: h = exp(delta A) h + delta u Bn; y = (Cn . h + D u) silu(z).
// Channels go a SIMD width at a time, so that their dot products Cn . h are reduced together
// (hsum_lanes) and the output is computed as vectors. kFull: N is a multiple of the SIMD width (no
// partial loads in the inner loop). Every pointer is a local, so that the compiler keeps them in
// registers across the stores to h.
template <typename scalar_t, bool kFull>
inline void mamba_update_row(const scalar_t* z, const scalar_t* ub, const scalar_t* Bn, const scalar_t* Cn,
                             const scalar_t* dl_b, scalar_t* hb, const scalar_t* A, const scalar_t* Dv,
                             scalar_t* yb, int64_t E, int64_t N) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  for (int64_t e0 = 0; e0 < E; e0 += W) {
    const int64_t ne = std::min(W, E - e0);
    Vec acc[W];
    for (int64_t l = 0; l < W; ++l) {
      acc[l] = Vec(0);
      if (l >= ne) continue;
      const int64_t e = e0 + l;
      scalar_t* h = hb + e * N;
      const scalar_t* Ae = A + e * N;
      const Vec dl(dl_b[e]), du(dl_b[e] * ub[e]);
      for (int64_t n0 = 0; n0 < N; n0 += W) {
        const int64_t cnt = kFull ? W : std::min(W, N - n0);
        const Vec a = scan_decay_exp(dl * hybridssm::load(Ae + n0, cnt));
        const Vec hn = at::vec::fmadd(a, hybridssm::load(h + n0, cnt), du * hybridssm::load(Bn + n0, cnt));
        hybridssm::store(hn, h + n0, cnt);
        // lanes past cnt hold zeros (partial loads fill zeros), so they add nothing
        acc[l] = at::vec::fmadd(hn, hybridssm::load(Cn + n0, cnt), acc[l]);
      }
    }
    const Vec out = (hsum_lanes(acc) + hybridssm::load(Dv + e0, ne) * hybridssm::load(ub + e0, ne)) *
                    silu(hybridssm::load(z + e0, ne));
    hybridssm::store(out, yb + e0, ne);
  }
}

// The state update and gated output of every row, with A = -exp(A_log) [E, N] computed once for the call.
template <typename scalar_t>
void mamba_update_rows(const scalar_t* xz, const scalar_t* u, const scalar_t* dbc, const scalar_t* delta,
                       scalar_t* ssm_state, const scalar_t* A_log, const scalar_t* Dv, scalar_t* y, int64_t Bsz,
                       int64_t E, int64_t R, int64_t N) {
  constexpr int64_t W = Vectorized<scalar_t>::size();
  std::vector<scalar_t> A(E * N);
  for (int64_t i = 0; i < E * N; i += W) {
    const int64_t cnt = std::min(W, E * N - i);
    hybridssm::store(hybridssm::load(A_log + i, cnt).exp().neg(), A.data() + i, cnt);
  }
  const scalar_t* Ap = A.data();
  const bool full = N % W == 0;
  at::parallel_for(0, Bsz, 1, [=](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* Bn = dbc + b * (R + 2 * N) + R;
      const auto row = full ? mamba_update_row<scalar_t, true> : mamba_update_row<scalar_t, false>;
      row(xz + b * 2 * E + E, u + b * E, Bn, Bn + N, delta + b * E, ssm_state + b * E * N, Ap, Dv, y + b * E, E, N);
    }
  });
}

inline at::Tensor mamba_mixer_step(const at::Tensor& x, const MixerSpec& m, at::Tensor* states,
                                   const at::Tensor& /*pos*/) {
  TORCH_CHECK(m.w.size() == 12, "mamba step: expected 12 weights, got ", m.w.size());
  const bool inner_norms = m.w[9].defined() && m.w[9].numel() > 0;
  const auto dt = x.scalar_type();
  const at::Tensor& conv = states[0];
  const at::Tensor& ssm = states[1];
  const int64_t Bsz = x.size(0), E = m.w[0].size(0) / 2, R = m.w[4].size(1), N = m.w[6].size(1);
  const int64_t K = m.w[1].size(-1);
  TORCH_CHECK(m.w[0].dim() == 2 && m.w[0].size(0) == 2 * E && m.w[1].numel() == E * K &&
                  m.w[3].dim() == 2 && m.w[3].size(0) == R + 2 * N && m.w[3].size(1) == E &&
                  m.w[4].size(0) == E && m.w[5].numel() == E && m.w[6].size(0) == E && m.w[7].numel() == E &&
                  m.w[8].dim() == 2 && m.w[8].size(1) == E,
              "mamba step: weights do not fit each other");
  TORCH_CHECK(conv.scalar_type() == dt && ssm.scalar_type() == dt, "mamba step: states must be in ", dt);
  TORCH_CHECK(conv.dim() == 3 && conv.size(0) == Bsz && conv.size(1) == E && conv.size(2) == K - 1 &&
                  ssm.dim() == 3 && ssm.size(0) == Bsz && ssm.size(1) == E && ssm.size(2) == N,
              "mamba step: states ", conv.sizes(), ", ", ssm.sizes(), " do not fit the weights (B=", Bsz,
              ", E=", E, ", K=", K, ", N=", N, ")");
  const auto xz = linear_small(x, as_(m.w[0], dt), at::Tensor()).contiguous();  // [B, 2E]
  const auto conv_w = as_(m.w[1], dt);
  const auto conv_b = opt(m.w[2], dt);
  auto u = at::empty({Bsz, E}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "mamba_conv", [&] {
    mamba_conv_rows<scalar_t>(xz.data_ptr<scalar_t>(), conv.data_ptr<scalar_t>(), conv_w.data_ptr<scalar_t>(),
                              conv_b ? conv_b->data_ptr<scalar_t>() : nullptr, u.data_ptr<scalar_t>(), Bsz, E, K);
  });
  // the x and dt projections: one gemv per row for a small batch, GEMMs for many streams
  const auto dbc = linear_small(u, as_(m.w[3], dt), at::Tensor()).contiguous();  // [B, R + 2N]
  if (inner_norms) {
    TORCH_CHECK(m.w[9].numel() == R && m.w[10].numel() == N && m.w[11].numel() == N && m.f.size() == 1,
                "mamba step: inner norms need weights [R], [N], [N] and their eps");
    const at::Tensor nw[3] = {as_(m.w[9], dt), as_(m.w[10], dt), as_(m.w[11], dt)};
    const int64_t offset[3] = {0, R, R + N}, width[3] = {R, N, N};
    AT_DISPATCH_FLOATING_TYPES(dt, "mamba_inner_norms", [&] {
      for (int i = 0; i < 3; ++i)
        rmsnorm_rows_inplace<scalar_t>(dbc.data_ptr<scalar_t>() + offset[i], Bsz, R + 2 * N, width[i],
                                       nw[i].data_ptr<scalar_t>(), m.f[0]);
    });
  }
  auto delta = linear_small(dbc.narrow(1, 0, R), as_(m.w[4], dt), as_(m.w[5], dt)).contiguous();  // [B, E]
  const auto A_log = as_(m.w[6], dt), Dv = as_(m.w[7], dt);
  auto y = at::empty({Bsz, E}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "mamba_update", [&] {
    softplus_inplace(delta.data_ptr<scalar_t>(), Bsz * E);
    mamba_update_rows<scalar_t>(xz.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), dbc.data_ptr<scalar_t>(),
                                delta.data_ptr<scalar_t>(), ssm.data_ptr<scalar_t>(), A_log.data_ptr<scalar_t>(),
                                Dv.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), Bsz, E, R, N);
  });
  return linear_small(y, as_(m.w[8], dt), at::Tensor());
}

HYBRIDSSM_MIXER_STEP(mamba, mamba_mixer_step, 2);

}  // namespace hybridssm::step
