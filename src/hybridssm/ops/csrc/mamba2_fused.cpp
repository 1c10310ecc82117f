// Fused CPU kernels of the Mamba-2 mixer, forward and backward:
//
//   ssd_*        the SSD recurrence (scalar decay per head, B / C shared by a group of heads)
//                  h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,   y_t = h_t C_t + D x_t
//   conv_silu_*  silu(causal depthwise conv + bias) over [B, T, C], channels contiguous
//   gnorm_*      rmsnorm_G(y * silu(z)) * weight (gated RMSNorm per group of channels)
//
// Inputs may be strided views (a split of the in_proj output) as long as the last dim is
// contiguous: the kernels take element strides, so the mixer never copies between the projection
// and the ops. Outputs are contiguous.
//
// SSD: work is split over (batch row, head). The state of one head, [P, N], is kept as N vectors
// over P (layout [n][p]): B_t[n] and C_t[n] are scalar broadcasts and the forward needs no
// horizontal sum. One exp per (t, head). The backward recomputes each chunk of kChunk steps from a
// checkpoint (the state before the chunk, saved by the forward), then runs the adjoint recurrence
// backwards; sums over P (dB, dC, d dt) are accumulated as vectors and reduced once per step.
//
// The build defines CPU_CAPABILITY (AVX2 / AVX512) so that at::vec uses real SIMD code.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "checks.h"
#include "vec_helpers.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using at::vec::Vectorized;
using hybridssm::hsum;
using hybridssm::load;
using hybridssm::store;

constexpr int64_t kChunk = 32;  // SSD backward recompute interval (steps per checkpoint)

// exp for the SiLU gates. float: inline (Cephes' expf: Cody-Waite reduction to |r| <= ln2 / 2, a
// degree-7 polynomial, scaling by 2^n through the exponent bits; within ~1 ULP of the true value).
// at::vec's exp is a call into libtorch, around which every live vector register is spilled: the
// kernels below were bound by those spills. double (gradcheck) keeps at::vec's 1-ULP exp.
inline Vectorized<float> exp_inline(const Vectorized<float>& x0) {
  using Vec = Vectorized<float>;
  // below -87.3 the result would be denormal: FLT_MIN stands in (1 + it is 1 in the sigmoid)
  const Vec x = at::vec::clamp(x0, Vec(-87.3f), Vec(88.3f));
  const Vec n = (x * Vec(1.44269504088896341f)).round();
  Vec r = at::vec::fmadd(n, Vec(-0.693359375f), x);  // ln 2 in two parts: n * hi is exact
  r = at::vec::fmadd(n, Vec(2.12194440e-4f), r);
  Vec p(1.9875691500e-4f);
  p = at::vec::fmadd(p, r, Vec(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, Vec(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, Vec(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, Vec(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, Vec(5.0000001201e-1f));
  p = at::vec::fmadd(p, r * r, r) + Vec(1.0f);
  const auto bits = (at::vec::convert_to_int_of_same_size(n) + Vectorized<int32_t>(127)) << Vectorized<int32_t>(23);
  return p * at::vec::cast<float>(bits);
}
inline Vectorized<double> exp_inline(const Vectorized<double>& x) { return x.exp(); }

template <typename scalar_t>
inline Vectorized<scalar_t> sigmoid(const Vectorized<scalar_t>& v) {
  using Vec = Vectorized<scalar_t>;
  return Vec(1) / (Vec(1) + exp_inline(v.neg()));
}

using hybridssm::check_arg;
using hybridssm::Layout;

// x [B, T, H, P], dt [B, T, H], A [H], B, C [B, T, G, N] with G dividing H, D [H]: every size the SSD
// kernels index with (x, B and C are read through their strides).
void check_ssd(const char* op, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
               const at::Tensor& Bm, const at::Tensor& Cm, const at::Tensor& Dv) {
  hybridssm::check_float(op, "x", x);
  TORCH_CHECK(x.dim() == 4 && Bm.dim() == 4, op, ": x must be [B, T, H, P] and B [B, T, G, N], got ", x.sizes(),
              " and ", Bm.sizes());
  const int64_t Bsz = x.size(0), T = x.size(1), H = x.size(2), P = x.size(3), G = Bm.size(2), N = Bm.size(3);
  TORCH_CHECK(G >= 1 && H % G == 0, op, ": the groups of B and C (", G, ") must divide the heads of x (", H, ")");
  const auto d = x.scalar_type();
  check_arg(op, "x", x, {Bsz, T, H, P}, d, Layout::InnerContiguous);
  check_arg(op, "dt", dt, {Bsz, T, H}, d);
  check_arg(op, "A", A, {H}, d);
  check_arg(op, "B", Bm, {Bsz, T, G, N}, d, Layout::InnerContiguous);
  check_arg(op, "C", Cm, {Bsz, T, G, N}, d, Layout::InnerContiguous);
  check_arg(op, "D", Dv, {H}, d);
}

// x [B, T, C] (strided rows), wt [K, C] with 1 <= K <= 64, bias [C], st [B, K-1, C].
void check_conv(const char* op, const at::Tensor& x, const at::Tensor& wt, const at::Tensor& bias,
                const at::Tensor& st) {
  hybridssm::check_float(op, "x", x);
  TORCH_CHECK(x.dim() == 3 && wt.dim() == 2, op, ": x must be [B, T, C] and wt [K, C], got ", x.sizes(), " and ",
              wt.sizes());
  const int64_t Bsz = x.size(0), T = x.size(1), C = x.size(2), K = wt.size(0);
  TORCH_CHECK(K >= 1 && K <= 64, op, ": the conv width K must be in 1..64, got ", K);
  const auto d = x.scalar_type();
  check_arg(op, "x", x, {Bsz, T, C}, d, Layout::InnerContiguous);
  check_arg(op, "wt", wt, {K, C}, d);
  check_arg(op, "bias", bias, {C}, d);
  check_arg(op, "st", st, {Bsz, K - 1, C}, d);
}

// y [B, T, E], z [B, T, E] (strided rows), w [E], G groups dividing E.
void check_gnorm(const char* op, const at::Tensor& y, const at::Tensor& z, const at::Tensor& w, int64_t G) {
  hybridssm::check_float(op, "y", y);
  TORCH_CHECK(y.dim() == 3, op, ": y must be [B, T, E], got ", y.sizes());
  const int64_t Bsz = y.size(0), T = y.size(1), E = y.size(2);
  TORCH_CHECK(G >= 1 && E % G == 0, op, ": groups must be a positive divisor of E = ", E, ", got ", G);
  check_arg(op, "y", y, {Bsz, T, E}, y.scalar_type());
  check_arg(op, "z", z, {Bsz, T, E}, y.scalar_type(), Layout::InnerContiguous);
  check_arg(op, "weight", w, {E}, y.scalar_type());
}

// -- SSD -----------------------------------------------------------------------------------------

struct SSDShape {
  int64_t Bsz, T, H, P, G, N, R, np, nck;
  int64_t sxb, sxt, sxh, sbb, sbt, sbg, scb, sct, scg;
};

SSDShape ssd_shape(const at::Tensor& x, const at::Tensor& Bm, const at::Tensor& Cm, int64_t W) {
  SSDShape s;
  s.Bsz = x.size(0), s.T = x.size(1), s.H = x.size(2), s.P = x.size(3);
  s.G = Bm.size(2), s.N = Bm.size(3), s.R = s.H / s.G;
  s.np = (s.P + W - 1) / W;
  s.nck = (s.T + kChunk - 1) / kChunk;
  s.sxb = x.stride(0), s.sxt = x.stride(1), s.sxh = x.stride(2);
  s.sbb = Bm.stride(0), s.sbt = Bm.stride(1), s.sbg = Bm.stride(2);
  s.scb = Cm.stride(0), s.sct = Cm.stride(1), s.scg = Cm.stride(2);
  return s;
}

// NF > 0 fixes N at compile time (the common N = 16) so that one P-vector's state stays in registers.
template <typename scalar_t, int NF>
void ssd_fwd_impl(const SSDShape& s, const scalar_t* x, const scalar_t* dt, const scalar_t* A,
                  const scalar_t* Bm, const scalar_t* Cm, const scalar_t* Dv, const scalar_t* h0,
                  scalar_t* y, scalar_t* hT, scalar_t* ckpt) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const int64_t T = s.T, H = s.H, P = s.P, np = s.np;
  const int64_t N = NF > 0 ? NF : s.N;
  at::parallel_for(0, s.Bsz * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> dec(T);
    std::vector<Vec> hbuf(NF > 0 ? 0 : N);
    Vec hfix[NF > 0 ? NF : 1];
    Vec* hv = NF > 0 ? hfix : hbuf.data();
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, g = h / s.R;
      const Vec Dd(Dv[h]);
      for (int64_t t = 0; t < T; ++t) dec[t] = std::exp(dt[(b * T + t) * H + h] * A[h]);
      const scalar_t* h0p = h0 + (b * H + h) * P * N;
      scalar_t* hTp = hT + (b * H + h) * P * N;
      // one P-vector at a time, over all steps: its N state vectors stay in registers
      for (int64_t v = 0; v < np; ++v) {
        const int64_t p0 = v * W, cnt = std::min(W, P - p0);
        for (int64_t n = 0; n < N; ++n) {  // state [P, N] (reference layout) -> N vectors over P
          alignas(64) scalar_t tmp[W] = {};
          for (int64_t l = 0; l < cnt; ++l) tmp[l] = h0p[(p0 + l) * N + n];
          hv[n] = Vec::loadu(tmp);
        }
        const scalar_t* xp = x + b * s.sxb + h * s.sxh + p0;
        const scalar_t* Bp = Bm + b * s.sbb + g * s.sbg;
        const scalar_t* Cp = Cm + b * s.scb + g * s.scg;
        scalar_t* yp = y + (b * T * H + h) * P + p0;
        for (int64_t t = 0; t < T; ++t) {
          if (ckpt != nullptr && t % kChunk == 0) {
            scalar_t* c = ckpt + ((b * H + h) * s.nck + t / kChunk) * N * P + p0;
            for (int64_t n = 0; n < N; ++n) store(hv[n], c + n * P, cnt);
          }
          const Vec xv = load(xp + t * s.sxt, cnt);
          const Vec xdt = xv * Vec(dt[(b * T + t) * H + h]);
          const Vec a(dec[t]);
          const scalar_t* Bt = Bp + t * s.sbt;
          const scalar_t* Ct = Cp + t * s.sct;
          // four partial sums: one chain of N dependent FMAs per step would bound the loop
          Vec acc = xv * Dd;
          for (int64_t n = 0; n < N; ++n) {
            hv[n] = at::vec::fmadd(a, hv[n], xdt * Vec(Bt[n]));
            acc = at::vec::fmadd(hv[n], Vec(Ct[n]), acc);
          }
          store(acc, yp + t * H * P, cnt);
        }
        for (int64_t n = 0; n < N; ++n) {
          alignas(64) scalar_t tmp[W];
          hv[n].store(tmp);
          for (int64_t l = 0; l < cnt; ++l) hTp[(p0 + l) * N + n] = tmp[l];
        }
      }
    }
  });
}

std::vector<at::Tensor> ssd_fwd(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                                const at::Tensor& Bm, const at::Tensor& Cm, const at::Tensor& Dv,
                                const at::Tensor& h0, bool save) {
  // x [B, T, H, P], dt [B, T, H], A [H], B, C [B, T, G, N], D [H], h0 [B, H, P, N]
  check_ssd("ssd_fwd", x, dt, A, Bm, Cm, Dv);
  const int64_t Bsz = x.size(0), T = x.size(1), H = x.size(2), P = x.size(3), N = Bm.size(3);
  check_arg("ssd_fwd", "h0", h0, {Bsz, H, P, N}, x.scalar_type());
  auto y = at::empty({Bsz, T, H, P}, x.options());
  auto hT = at::empty({Bsz, H, P, N}, x.options());
  const int64_t nck = (T + kChunk - 1) / kChunk;
  auto ckpt = save ? at::empty({Bsz, H, nck, N, P}, x.options()) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssd_fwd", [&] {
    const SSDShape s = ssd_shape(x, Bm, Cm, Vectorized<scalar_t>::size());
    auto run = N == 16 ? ssd_fwd_impl<scalar_t, 16> : ssd_fwd_impl<scalar_t, 0>;
    run(s, x.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(), Bm.data_ptr<scalar_t>(),
        Cm.data_ptr<scalar_t>(), Dv.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
        hT.data_ptr<scalar_t>(), save ? ckpt.data_ptr<scalar_t>() : nullptr);
  });
  return {y, hT, ckpt};
}

template <typename scalar_t, int NF>
void ssd_bwd_impl(const SSDShape& s, const scalar_t* dy, const scalar_t* dhT, const scalar_t* x,
                  const scalar_t* dt, const scalar_t* A, const scalar_t* Bm, const scalar_t* Cm,
                  const scalar_t* Dv, const scalar_t* ckpt, scalar_t* dx, scalar_t* ddt,
                  scalar_t* dA_part, scalar_t* dB_part, scalar_t* dC_part, scalar_t* dD_part,
                  scalar_t* dh0) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const int64_t T = s.T, H = s.H, P = s.P, np = s.np;
  const int64_t N = NF > 0 ? NF : s.N;
  at::parallel_for(0, s.Bsz * H, 1, [&](int64_t begin, int64_t end) {
    // per chunk: the states of one P-vector (kChunk + 1 steps), and the vector partials over P of
    // dB, dC (per step and n), of da and of the x part of d dt (per step), summed over P-vectors
    std::vector<Vec> Hs((kChunk + 1) * N), carry(N * np), dBl(kChunk * N), dCl(kChunk * N);
    std::vector<Vec> daV(kChunk), dxxV(kChunk);
    std::vector<scalar_t> dec(kChunk);
    std::vector<Vec> gbuf(NF > 0 ? 0 : N);
    Vec gfix[NF > 0 ? NF : 1];
    Vec* gs = NF > 0 ? gfix : gbuf.data();
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, g = h / s.R;
      const scalar_t Ah = A[h];
      const Vec Dd(Dv[h]);
      const scalar_t* dhTp = dhT + (b * H + h) * P * N;
      for (int64_t v = 0; v < np; ++v) {
        for (int64_t n = 0; n < N; ++n) {
          alignas(64) scalar_t tmp[W] = {};
          for (int64_t l = 0; l < W && v * W + l < P; ++l) tmp[l] = dhTp[(v * W + l) * N + n];
          carry[v * N + n] = Vec::loadu(tmp);
        }
      }
      scalar_t dA_acc = 0;
      Vec dD_acc(0);
      const scalar_t* xh = x + b * s.sxb + h * s.sxh;
      const scalar_t* Bp = Bm + b * s.sbb + g * s.sbg;
      const scalar_t* Cp = Cm + b * s.scb + g * s.scg;
      const scalar_t* dth = dt + b * T * H + h;
      for (int64_t c = s.nck - 1; c >= 0; --c) {
        const int64_t t0 = c * kChunk, L = std::min(kChunk, T - t0);
        std::fill(dBl.begin(), dBl.begin() + L * N, Vec(0));
        std::fill(dCl.begin(), dCl.begin() + L * N, Vec(0));
        std::fill(daV.begin(), daV.begin() + L, Vec(0));
        std::fill(dxxV.begin(), dxxV.begin() + L, Vec(0));
        for (int64_t j = 0; j < L; ++j) dec[j] = std::exp(dth[(t0 + j) * H] * Ah);
        const scalar_t* cp = ckpt + ((b * H + h) * s.nck + c) * N * P;
        for (int64_t v = 0; v < np; ++v) {
          const int64_t p0 = v * W, cnt = std::min(W, P - p0);
          // 1. recompute this P-vector's states: Hs[j] = h_{t0 + j - 1}
          for (int64_t n = 0; n < N; ++n) Hs[n] = load(cp + n * P + p0, cnt);
          for (int64_t j = 0; j < L; ++j) {
            const int64_t t = t0 + j;
            const Vec a(dec[j]);
            const Vec xdt = load(xh + t * s.sxt + p0, cnt) * Vec(dth[t * H]);
            const scalar_t* Bt = Bp + t * s.sbt;
            const Vec* hp = Hs.data() + j * N;
            Vec* hn = Hs.data() + (j + 1) * N;
            for (int64_t n = 0; n < N; ++n) hn[n] = at::vec::fmadd(a, hp[n], xdt * Vec(Bt[n]));
          }
          // 2. adjoint recurrence backwards; gs = dL/dh_t from later steps (a_{t+1} G_{t+1})
          for (int64_t n = 0; n < N; ++n) gs[n] = carry[v * N + n];
          for (int64_t j = L - 1; j >= 0; --j) {
            const int64_t t = t0 + j;
            const scalar_t d = dth[t * H];
            const Vec a(dec[j]);
            const Vec xv = load(xh + t * s.sxt + p0, cnt);
            const Vec gy = load(dy + ((b * T + t) * H + h) * P + p0, cnt);
            const Vec xdt = xv * Vec(d);
            const scalar_t* Bt = Bp + t * s.sbt;
            const scalar_t* Ct = Cp + t * s.sct;
            const Vec* hprev = Hs.data() + j * N;
            const Vec* hcur = Hs.data() + (j + 1) * N;
            Vec* dBj = dBl.data() + j * N;
            Vec* dCj = dCl.data() + j * N;
            Vec dxdt(0), da(0);
            for (int64_t n = 0; n < N; ++n) {
              const Vec Gn = at::vec::fmadd(Vec(Ct[n]), gy, gs[n]);  // dL/dh_t
              dCj[n] = at::vec::fmadd(gy, hcur[n], dCj[n]);
              dBj[n] = at::vec::fmadd(Gn, xdt, dBj[n]);
              dxdt = at::vec::fmadd(Gn, Vec(Bt[n]), dxdt);
              da = at::vec::fmadd(Gn, hprev[n], da);
              gs[n] = Gn * a;
            }
            store(at::vec::fmadd(dxdt, Vec(d), Dd * gy), dx + ((b * T + t) * H + h) * P + p0, cnt);
            dxxV[j] = at::vec::fmadd(dxdt, xv, dxxV[j]);
            daV[j] = daV[j] + da;
            dD_acc = at::vec::fmadd(gy, xv, dD_acc);
          }
          for (int64_t n = 0; n < N; ++n) carry[v * N + n] = gs[n];
        }
        // 3. reduce the vector partials over P, once per step
        for (int64_t j = 0; j < L; ++j) {
          const int64_t t = t0 + j;
          const scalar_t d = dth[t * H];
          const scalar_t da = hsum(daV[j]) * dec[j];  // dL/d(dt A)
          ddt[(b * T + t) * H + h] = hsum(dxxV[j]) + da * Ah;
          dA_acc += da * d;
          scalar_t* dBo = dB_part + ((b * T + t) * H + h) * N;
          scalar_t* dCo = dC_part + ((b * T + t) * H + h) * N;
          for (int64_t n = 0; n < N; ++n) {
            dBo[n] = hsum(dBl[j * N + n]);
            dCo[n] = hsum(dCl[j * N + n]);
          }
        }
      }
      dA_part[b * H + h] = dA_acc;
      dD_part[b * H + h] = hsum(dD_acc);
      scalar_t* dh0p = dh0 + (b * H + h) * P * N;
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t v = 0; v < np; ++v) {
          alignas(64) scalar_t tmp[W];
          carry[v * N + n].store(tmp);
          for (int64_t l = 0; l < W && v * W + l < P; ++l) dh0p[(v * W + l) * N + n] = tmp[l];
        }
      }
    }
  });
}

std::vector<at::Tensor> ssd_bwd(const at::Tensor& dy, const at::Tensor& dhT, const at::Tensor& x,
                                const at::Tensor& dt, const at::Tensor& A, const at::Tensor& Bm,
                                const at::Tensor& Cm, const at::Tensor& Dv, const at::Tensor& ckpt) {
  check_ssd("ssd_bwd", x, dt, A, Bm, Cm, Dv);
  const int64_t Bsz = x.size(0), T = x.size(1), H = x.size(2), P = x.size(3), N = Bm.size(3);
  check_arg("ssd_bwd", "dy", dy, {Bsz, T, H, P}, x.scalar_type());
  check_arg("ssd_bwd", "dhT", dhT, {Bsz, H, P, N}, x.scalar_type());
  hybridssm::check_saved("ssd_bwd", "ckpt", ckpt, Bsz * H * ((T + kChunk - 1) / kChunk) * N * P, x.scalar_type());
  auto opts = x.options();
  auto dx = at::empty({Bsz, T, H, P}, opts);
  auto ddt = at::empty({Bsz, T, H}, opts);
  auto dA_part = at::empty({Bsz, H}, opts);
  auto dD_part = at::empty({Bsz, H}, opts);
  auto dB_part = at::empty({Bsz, T, H, N}, opts);  // per head; the caller sums a group's heads
  auto dC_part = at::empty({Bsz, T, H, N}, opts);
  auto dh0 = at::empty({Bsz, H, P, N}, opts);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssd_bwd", [&] {
    const SSDShape s = ssd_shape(x, Bm, Cm, Vectorized<scalar_t>::size());
    auto run = N == 16 ? ssd_bwd_impl<scalar_t, 16> : ssd_bwd_impl<scalar_t, 0>;
    run(s, dy.data_ptr<scalar_t>(), dhT.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(),
        A.data_ptr<scalar_t>(), Bm.data_ptr<scalar_t>(), Cm.data_ptr<scalar_t>(), Dv.data_ptr<scalar_t>(),
        ckpt.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), ddt.data_ptr<scalar_t>(),
        dA_part.data_ptr<scalar_t>(), dB_part.data_ptr<scalar_t>(), dC_part.data_ptr<scalar_t>(),
        dD_part.data_ptr<scalar_t>(), dh0.data_ptr<scalar_t>());
  });
  return {dx, ddt, dA_part, dB_part, dC_part, dD_part, dh0};
}

// -- causal depthwise conv + SiLU -----------------------------------------------------------------
// x [B, T, C] (strided rows), wt [K, C] (the weight transposed), bias [C], st [B, K-1, C] (the
// last K-1 raw inputs before x, transposed). KF > 0 fixes K at compile time (the usual 4).

template <typename scalar_t, int KF>
void conv_silu_fwd_impl(const scalar_t* xp, int64_t sxb, int64_t sxt, const scalar_t* wp,
                        const scalar_t* bp, const scalar_t* sp, scalar_t* yp, int64_t Bsz, int64_t T,
                        int64_t C, int64_t K_) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const int64_t K = KF > 0 ? KF : K_;
  at::parallel_for(0, Bsz * T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / T, t = r % T;
      // the K input rows this output reads (the state's rows before time 0)
      const scalar_t* rows[KF > 0 ? KF : 64];
      for (int64_t k = 0; k < K; ++k) {
        const int64_t src = t + k - (K - 1);
        rows[k] = src >= 0 ? xp + b * sxb + src * sxt : sp + (b * (K - 1) + src + K - 1) * C;
      }
      scalar_t* yr = yp + r * C;
      for (int64_t c = 0; c < C; c += W) {
        const int64_t cnt = std::min(W, C - c);
        Vec pre = load(bp + c, cnt);
        for (int64_t k = 0; k < K; ++k) pre = at::vec::fmadd(load(wp + k * C + c, cnt), load(rows[k] + c, cnt), pre);
        store(pre * sigmoid(pre), yr + c, cnt);
      }
    }
  });
}

at::Tensor conv_silu_fwd(const at::Tensor& x, const at::Tensor& wt, const at::Tensor& bias,
                         const at::Tensor& st) {
  check_conv("conv_silu_fwd", x, wt, bias, st);
  const int64_t Bsz = x.size(0), T = x.size(1), C = x.size(2), K = wt.size(0);
  auto y = at::empty({Bsz, T, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_silu_fwd", [&] {
    auto run = K == 4 ? conv_silu_fwd_impl<scalar_t, 4> : conv_silu_fwd_impl<scalar_t, 0>;
    run(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), wt.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
        st.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), Bsz, T, C, K);
  });
  return y;
}

// Backward: one channel vector at a time down a block of kConvSteps steps (the block's rows stay
// in cache across the channel vectors), with the last K inputs and the last K pre-activation
// gradients in registers and the weight / bias gradients accumulated in registers. Work is split
// over channel vectors only, so those gradients need no reduction across threads.
constexpr int64_t kConvSteps = 64;

template <typename scalar_t, int KF>
void conv_silu_bwd_impl(const scalar_t* gp, const scalar_t* xp, int64_t sxb, int64_t sxt,
                        const scalar_t* wp, const scalar_t* bp, const scalar_t* sp, scalar_t* dxp,
                        scalar_t* dwp, scalar_t* dbp, scalar_t* dsp, int64_t Bsz, int64_t T, int64_t C,
                        int64_t K_) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  constexpr int64_t KM = KF > 0 ? KF : 64;
  const int64_t K = KF > 0 ? KF : K_;
  const int64_t nvec = (C + W - 1) / W;
  at::parallel_for(0, nvec, 1, [&](int64_t v0, int64_t v1) {
    const int64_t c0 = v0 * W, c1 = std::min(C, v1 * W);
    // per channel vector: the last K-1 pre-activation gradients of the previous step block
    std::vector<scalar_t> carry(std::max<int64_t>(K - 1, 1) * (c1 - c0));
    std::vector<Vec> dwacc(K * (v1 - v0), Vec(0)), dbacc(v1 - v0, Vec(0));
    for (int64_t b = 0; b < Bsz; ++b) {
      std::fill(carry.begin(), carry.end(), scalar_t(0));
      // blocks of steps; the last one also flushes the input gradients of times T-K+1 .. T-1
      for (int64_t t0 = 0; t0 < T; t0 += kConvSteps) {
        const int64_t t1 = std::min(T, t0 + kConvSteps);
        const int64_t tend = t1 == T ? T + K - 1 : t1;
        for (int64_t v = v0; v < v1; ++v) {
          const int64_t c = v * W, cnt = std::min(W, C - c), lc = c - c0;
          Vec w[KM], xw[KM], gw[KM], dw[KM];
          for (int64_t k = 0; k < K; ++k) {
            w[k] = load(wp + k * C + c, cnt);
            dw[k] = dwacc[(v - v0) * K + k];
          }
          Vec db = dbacc[v - v0];
          const Vec bias = load(bp + c, cnt);
          // windows: xw[k] = input at t - (K-1) + k, gw[k] = gradient of pre at t - (K-1) + k
          for (int64_t k = 0; k + 1 < K; ++k) {
            const int64_t src = t0 - (K - 1) + k;
            xw[k + 1] = load(src >= 0 ? xp + b * sxb + src * sxt + c : sp + (b * (K - 1) + src + K - 1) * C + c, cnt);
            gw[k + 1] = load(carry.data() + k * (c1 - c0) + lc, cnt);
          }
          for (int64_t t = t0; t < tend; ++t) {
            for (int64_t k = 0; k + 1 < K; ++k) {
              xw[k] = xw[k + 1];
              gw[k] = gw[k + 1];
            }
            Vec g(0);
            if (t < T) {
              xw[K - 1] = load(xp + b * sxb + t * sxt + c, cnt);
              Vec pre = bias;
              for (int64_t k = 0; k < K; ++k) pre = at::vec::fmadd(w[k], xw[k], pre);
              const Vec sg = sigmoid(pre);
              g = load(gp + (b * T + t) * C + c, cnt) * sg * at::vec::fmadd(pre, Vec(1) - sg, Vec(1));
              db = db + g;
              for (int64_t k = 0; k < K; ++k) dw[k] = at::vec::fmadd(g, xw[k], dw[k]);
            }
            gw[K - 1] = g;
            // the input at s = t - (K-1) feeds outputs s .. s+K-1 through taps K-1 .. 0
            Vec acc(0);
            for (int64_t k = 0; k < K; ++k) acc = at::vec::fmadd(w[k], gw[K - 1 - k], acc);
            const int64_t s = t - (K - 1);
            store(acc, s >= 0 ? dxp + (b * T + s) * C + c : dsp + (b * (K - 1) + s + K - 1) * C + c, cnt);
          }
          for (int64_t k = 0; k + 1 < K; ++k) store(gw[k + 1], carry.data() + k * (c1 - c0) + lc, cnt);
          for (int64_t k = 0; k < K; ++k) dwacc[(v - v0) * K + k] = dw[k];
          dbacc[v - v0] = db;
        }
      }
    }
    for (int64_t v = v0; v < v1; ++v) {
      const int64_t c = v * W, cnt = std::min(W, C - c);
      for (int64_t k = 0; k < K; ++k) store(dwacc[(v - v0) * K + k], dwp + k * C + c, cnt);
      store(dbacc[v - v0], dbp + c, cnt);
    }
  });
}

std::vector<at::Tensor> conv_silu_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wt,
                                      const at::Tensor& bias, const at::Tensor& st) {
  check_conv("conv_silu_bwd", x, wt, bias, st);
  const int64_t Bsz = x.size(0), T = x.size(1), C = x.size(2), K = wt.size(0);
  check_arg("conv_silu_bwd", "dy", dy, {Bsz, T, C}, x.scalar_type());
  auto dx = at::empty({Bsz, T, C}, x.options());
  auto dst = at::empty({Bsz, K - 1, C}, x.options());
  auto dwt = at::empty({K, C}, x.options());
  auto dbias = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_silu_bwd", [&] {
    auto run = K == 4 ? conv_silu_bwd_impl<scalar_t, 4> : conv_silu_bwd_impl<scalar_t, 0>;
    run(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), wt.data_ptr<scalar_t>(),
        bias.data_ptr<scalar_t>(), st.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), dwt.data_ptr<scalar_t>(),
        dbias.data_ptr<scalar_t>(), dst.data_ptr<scalar_t>(), Bsz, T, C, K);
  });
  return {dx, dwt, dbias, dst};
}

// -- gated RMSNorm -------------------------------------------------------------------------------
// y [B, T, E] contiguous, z [B, T, E] (strided rows), w [E]; groups of E / G channels.
// out = (y silu(z)) * rstd * w with rstd = 1 / sqrt(mean_group((y silu(z))^2) + eps).

std::vector<at::Tensor> gnorm_fwd(const at::Tensor& y, const at::Tensor& z, const at::Tensor& w,
                                  int64_t G, double eps) {
  check_gnorm("gnorm_fwd", y, z, w, G);
  const int64_t Bsz = y.size(0), T = y.size(1), E = y.size(2), Eg = E / G;
  auto out = at::empty({Bsz, T, E}, y.options());
  auto rstd = at::empty({Bsz, T, G}, y.options());
  const int64_t szb = z.stride(0), szt = z.stride(1);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "gnorm_fwd", [&] {
    using Vec = Vectorized<scalar_t>;
    constexpr int64_t W = Vec::size();
    const scalar_t *yp = y.data_ptr<scalar_t>(), *zp = z.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
    scalar_t *op = out.data_ptr<scalar_t>(), *rp = rstd.data_ptr<scalar_t>();
    at::parallel_for(0, Bsz * T, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / T, t = r % T;
        const scalar_t* yr = yp + r * E;
        const scalar_t* zr = zp + b * szb + t * szt;
        scalar_t* orow = op + r * E;
        for (int64_t g = 0; g < G; ++g) {
          Vec ss(0);
          for (int64_t c = g * Eg; c < (g + 1) * Eg; c += W) {
            const int64_t cnt = std::min(W, (g + 1) * Eg - c);
            const Vec zv = load(zr + c, cnt);
            const Vec gz = load(yr + c, cnt) * zv * sigmoid(zv);
            store(gz, orow + c, cnt);  // y silu(z), scaled below
            ss = at::vec::fmadd(gz, gz, ss);
          }
          const scalar_t rs = scalar_t(1) / std::sqrt(hsum(ss) / scalar_t(Eg) + scalar_t(eps));
          rp[r * G + g] = rs;
          for (int64_t c = g * Eg; c < (g + 1) * Eg; c += W) {
            const int64_t cnt = std::min(W, (g + 1) * Eg - c);
            store(load(orow + c, cnt) * Vec(rs) * load(wp + c, cnt), orow + c, cnt);
          }
        }
      }
    });
  });
  return {out, rstd};
}

std::vector<at::Tensor> gnorm_bwd(const at::Tensor& dout, const at::Tensor& y, const at::Tensor& z,
                                  const at::Tensor& w, const at::Tensor& rstd) {
  TORCH_CHECK(rstd.dim() == 3, "gnorm_bwd: rstd must be [B, T, groups], got ", rstd.sizes());
  const int64_t G = rstd.size(2);
  check_gnorm("gnorm_bwd", y, z, w, G);
  const int64_t Bsz = y.size(0), T = y.size(1), E = y.size(2), Eg = E / G;
  check_arg("gnorm_bwd", "dout", dout, {Bsz, T, E}, y.scalar_type());
  check_arg("gnorm_bwd", "rstd", rstd, {Bsz, T, G}, y.scalar_type());
  auto dy = at::empty({Bsz, T, E}, y.options());
  auto dz = at::empty({Bsz, T, E}, y.options());
  const int64_t nthr = at::get_num_threads();
  auto dw_part = at::zeros({nthr, E}, y.options());
  const int64_t szb = z.stride(0), szt = z.stride(1);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "gnorm_bwd", [&] {
    using Vec = Vectorized<scalar_t>;
    constexpr int64_t W = Vec::size();
    const scalar_t *gp = dout.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>();
    const scalar_t *zp = z.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
    const scalar_t* rp = rstd.data_ptr<scalar_t>();
    scalar_t *dyp = dy.data_ptr<scalar_t>(), *dzp = dz.data_ptr<scalar_t>();
    scalar_t* dwp = dw_part.data_ptr<scalar_t>();
    at::parallel_for(0, Bsz * T, 16, [&](int64_t begin, int64_t end) {
      scalar_t* dwt = dwp + at::get_thread_num() * E;
      std::vector<scalar_t> sgrow(E);  // sigmoid(z) of the row, from the first pass
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / T, t = r % T;
        const scalar_t* yr = yp + r * E;
        const scalar_t* zr = zp + b * szb + t * szt;
        const scalar_t* gr = gp + r * E;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t e0 = g * Eg, e1 = (g + 1) * Eg;
          const Vec rs(rp[r * G + g]);
          // mean over the group of dn * nhat, with dn = dout * w and nhat = y silu(z) rstd
          Vec dot(0);
          for (int64_t c = e0; c < e1; c += W) {
            const int64_t cnt = std::min(W, e1 - c);
            const Vec zv = load(zr + c, cnt), go = load(gr + c, cnt);
            const Vec sg = sigmoid(zv);
            store(sg, sgrow.data() + c, cnt);
            const Vec nh = load(yr + c, cnt) * zv * sg * rs;
            dot = at::vec::fmadd(go * load(wp + c, cnt), nh, dot);
            store(at::vec::fmadd(go, nh, load(dwt + c, cnt)), dwt + c, cnt);
          }
          const Vec mdot(hsum(dot) / scalar_t(Eg));
          for (int64_t c = e0; c < e1; c += W) {
            const int64_t cnt = std::min(W, e1 - c);
            const Vec zv = load(zr + c, cnt), yv = load(yr + c, cnt), go = load(gr + c, cnt);
            const Vec sg = load(sgrow.data() + c, cnt);
            const Vec sz = zv * sg;
            const Vec nh = yv * sz * rs;
            const Vec dg = rs * (go * load(wp + c, cnt) - nh * mdot);  // dL/d(y silu(z))
            store(dg * sz, dyp + r * E + c, cnt);
            store(dg * yv * sg * at::vec::fmadd(zv, Vec(1) - sg, Vec(1)), dzp + r * E + c, cnt);
          }
        }
      }
    });
  });
  return {dy, dz, dw_part.sum(0)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sigmoid_test", [](const at::Tensor& x) {  // the kernels' sigmoid, for the tests
    TORCH_CHECK(x.is_contiguous() && x.device().is_cpu(), "sigmoid_test: contiguous CPU tensor");
    auto y = at::empty_like(x);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sigmoid_test", [&] {
      using Vec = Vectorized<scalar_t>;
      const scalar_t* xp = x.data_ptr<scalar_t>();
      scalar_t* yp = y.data_ptr<scalar_t>();
      for (int64_t i = 0; i < x.numel(); i += Vec::size()) {
        const int64_t cnt = std::min<int64_t>(Vec::size(), x.numel() - i);
        store(sigmoid(load(xp + i, cnt)), yp + i, cnt);
      }
    });
    return y;
  });
  m.def("ssd_fwd", &ssd_fwd, "SSD recurrence forward (y, hT, checkpoints)");
  m.def("ssd_bwd", &ssd_bwd, "SSD recurrence backward");
  m.def("conv_silu_fwd", &conv_silu_fwd, "silu(causal depthwise conv + bias)");
  m.def("conv_silu_bwd", &conv_silu_bwd, "backward of conv_silu_fwd (dx, dwt, dbias, dstate)");
  m.def("gnorm_fwd", &gnorm_fwd, "gated RMSNorm forward (out, rstd)");
  m.def("gnorm_bwd", &gnorm_bwd, "gated RMSNorm backward (dy, dz, dweight)");
}
