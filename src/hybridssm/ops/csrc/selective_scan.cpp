// Fused CPU selective scan (Mamba-1 / S6), forward and backward (the streaming step is csrc/step/mamba.h).
//
//   h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (per channel d, state n)
//   y_t = sum_n C_tn h_tn + D * u_t
//
// Layouts (all contiguous): u, delta, y [B, T, Dn]; At [N, Dn] (A transposed so that a block of
// channels is contiguous); Bm, Cm [B, T, N]; Dv [Dn]; h0, hT [B, Dn, N] (the reference layout).
// Checkpoints (internal) [B, nchunks, N, Dn]: the state before each chunk of kChunk steps.
//
// Work is split over (batch, block of W channels), W = the SIMD width, with at::parallel_for; the
// W x N state lives in registers (vectorised over channels, so B_t and C_t are scalar broadcasts
// and no horizontal sum is needed in the forward). One exp per (t, d, n). The backward recomputes
// each chunk from its checkpoint (states and decays kept in a small per-thread buffer) and then
// runs the adjoint recurrence backwards; dB and dC need a sum over channels, accumulated across a
// thread's channel blocks in vector form and reduced once per chunk.
//
// The build defines CPU_CAPABILITY (AVX2 / AVX512) so that at::vec uses real SIMD code.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "checks.h"
#include "vec_helpers.h"

#include <algorithm>
#include <vector>

namespace {

using at::vec::Vectorized;
using hybridssm::load;
using hybridssm::store;

constexpr int64_t kChunk = 32;  // backward recompute interval (steps per checkpoint)

// exp for decays. fp32: a polynomial exp (at::vec's exp_u20, ~1e-6 relative error near x = 0
// shrinks with |x|, far below the fp32 test class) is ~2x cheaper than Sleef's 1-ULP exp, and the
// scan is bound by this exp. fp64 keeps the 1-ULP exp (gradcheck).
inline Vectorized<float> decay_exp(const Vectorized<float>& x) { return x.exp_u20(); }
inline Vectorized<double> decay_exp(const Vectorized<double>& x) { return x.exp(); }

// Gather / scatter one channel block of a [Dn, N] state to / from N vectors of W channels.
template <typename scalar_t>
inline void gather_state(const scalar_t* s, int64_t N, int64_t cnt, Vectorized<scalar_t>* h) {
  using Vec = Vectorized<scalar_t>;
  alignas(64) scalar_t tmp[Vec::size()];
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t l = 0; l < Vec::size(); ++l) tmp[l] = l < cnt ? s[l * N + n] : scalar_t(0);
    h[n] = Vec::loadu(tmp);
  }
}

template <typename scalar_t>
inline void scatter_state(const Vectorized<scalar_t>* h, int64_t N, int64_t cnt, scalar_t* s) {
  using Vec = Vectorized<scalar_t>;
  alignas(64) scalar_t tmp[Vec::size()];
  for (int64_t n = 0; n < N; ++n) {
    h[n].store(tmp);
    for (int64_t l = 0; l < cnt; ++l) s[l * N + n] = tmp[l];
  }
}

// NF > 0 fixes N at compile time (the common N = 16) so the state stays in registers.
template <typename scalar_t, int NF>
void scan_fwd_impl(const scalar_t* u, const scalar_t* delta, const scalar_t* At, const scalar_t* Bm,
                   const scalar_t* Cm, const scalar_t* Dv, const scalar_t* h0, scalar_t* y,
                   scalar_t* hT, scalar_t* ckpt, int64_t Bsz, int64_t T, int64_t Dn, int64_t N_) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const int64_t N = NF > 0 ? NF : N_;
  const int64_t nblk = (Dn + W - 1) / W;
  const int64_t nchunks = (T + kChunk - 1) / kChunk;
  at::parallel_for(0, Bsz * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<Vec> hbuf(NF > 0 ? 0 : N);
    Vec hfix[NF > 0 ? NF : 1];
    Vec* h = NF > 0 ? hfix : hbuf.data();
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / nblk, d0 = (i % nblk) * W, cnt = std::min(W, Dn - d0);
      gather_state(h0 + (b * Dn + d0) * N, N, cnt, h);
      const Vec Dd = load(Dv + d0, cnt);
      for (int64_t t = 0; t < T; ++t) {
        if (ckpt != nullptr && t % kChunk == 0) {
          scalar_t* c = ckpt + (b * nchunks + t / kChunk) * N * Dn + d0;
          for (int64_t n = 0; n < N; ++n) store(h[n], c + n * Dn, cnt);
        }
        const int64_t off = (b * T + t) * Dn + d0;
        const Vec dl = load(delta + off, cnt), uu = load(u + off, cnt);
        const Vec du = dl * uu;
        Vec acc = Dd * uu;
        const scalar_t* Bt = Bm + (b * T + t) * N;
        const scalar_t* Ct = Cm + (b * T + t) * N;
        for (int64_t n = 0; n < N; ++n) {
          const Vec a = decay_exp(dl * load(At + n * Dn + d0, cnt));
          h[n] = at::vec::fmadd(a, h[n], du * Vec(Bt[n]));
          acc = at::vec::fmadd(h[n], Vec(Ct[n]), acc);
        }
        store(acc, y + off, cnt);
      }
      scatter_state(h, N, cnt, hT + (b * Dn + d0) * N);
    }
  });
}

template <typename scalar_t, int NF>
void scan_bwd_impl(const scalar_t* dy, const scalar_t* dhT, const scalar_t* u, const scalar_t* delta,
                   const scalar_t* At, const scalar_t* Bm, const scalar_t* Cm, const scalar_t* Dv,
                   const scalar_t* ckpt, scalar_t* du_out, scalar_t* ddelta_out, scalar_t* dA_part,
                   scalar_t* dB_part, scalar_t* dC_part, scalar_t* dD_part, scalar_t* dh0,
                   int64_t Bsz, int64_t T, int64_t Dn, int64_t N_, int64_t G) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const int64_t N = NF > 0 ? NF : N_;
  const int64_t nblk = (Dn + W - 1) / W;
  const int64_t per_group = (nblk + G - 1) / G;
  const int64_t nchunks = (T + kChunk - 1) / kChunk;
  // one unit = (batch row, group of channel blocks); dB / dC partial sums per group: [G, B, T, N]
  at::parallel_for(0, Bsz * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<Vec> H((kChunk + 1) * N), Adec(kChunk * N), dBl(kChunk * N), dCl(kChunk * N);
    std::vector<Vec> carry, dA_acc, dD_acc;
    alignas(64) scalar_t tmp[W];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / G, g = i % G;
      const int64_t blk0 = g * per_group, blk1 = std::min(nblk, blk0 + per_group);
      if (blk0 >= blk1) continue;
      const int64_t nb = blk1 - blk0;
      carry.assign(nb * N, Vec(0));
      dA_acc.assign(nb * N, Vec(0));
      dD_acc.assign(nb, Vec(0));
      for (int64_t k = 0; k < nb; ++k) {
        const int64_t d0 = (blk0 + k) * W;
        gather_state(dhT + (b * Dn + d0) * N, N, std::min(W, Dn - d0), carry.data() + k * N);
      }
      scalar_t* dBp = dB_part + (g * Bsz + b) * T * N;
      scalar_t* dCp = dC_part + (g * Bsz + b) * T * N;
      for (int64_t c = nchunks - 1; c >= 0; --c) {
        const int64_t t0 = c * kChunk, L = std::min(kChunk, T - t0);
        std::fill(dBl.begin(), dBl.begin() + L * N, Vec(0));
        std::fill(dCl.begin(), dCl.begin() + L * N, Vec(0));
        for (int64_t k = 0; k < nb; ++k) {
          const int64_t d0 = (blk0 + k) * W, cnt = std::min(W, Dn - d0);
          // 1. recompute the chunk's states from its checkpoint: H[j] = h_{t0 + j - 1}
          const scalar_t* cp = ckpt + (b * nchunks + c) * N * Dn + d0;
          for (int64_t n = 0; n < N; ++n) H[n] = load(cp + n * Dn, cnt);
          for (int64_t j = 0; j < L; ++j) {
            const int64_t off = (b * T + t0 + j) * Dn + d0;
            const Vec dl = load(delta + off, cnt), uu = load(u + off, cnt);
            const Vec du = dl * uu;
            const scalar_t* Bt = Bm + (b * T + t0 + j) * N;
            for (int64_t n = 0; n < N; ++n) {
              const Vec a = decay_exp(dl * load(At + n * Dn + d0, cnt));
              Adec[j * N + n] = a;
              H[(j + 1) * N + n] = at::vec::fmadd(a, H[j * N + n], du * Vec(Bt[n]));
            }
          }
          // 2. adjoint recurrence backwards: gs = dL/dh_t; carried as dL/dh_t * a_t to t - 1
          Vec gfix[NF > 0 ? NF : 1];
          std::vector<Vec> gbuf(NF > 0 ? 0 : N);
          Vec* gs = NF > 0 ? gfix : gbuf.data();
          Vec dA[NF > 0 ? NF : 1];
          std::vector<Vec> dAbuf(NF > 0 ? 0 : N);
          Vec* dAv = NF > 0 ? dA : dAbuf.data();
          for (int64_t n = 0; n < N; ++n) {
            gs[n] = carry[k * N + n];
            dAv[n] = dA_acc[k * N + n];
          }
          const Vec Dd = load(Dv + d0, cnt);
          Vec dDv = dD_acc[k];
          for (int64_t j = L - 1; j >= 0; --j) {
            const int64_t t = t0 + j;
            const int64_t off = (b * T + t) * Dn + d0;
            const Vec dl = load(delta + off, cnt), uu = load(u + off, cnt), gy = load(dy + off, cnt);
            const Vec du = dl * uu;
            const scalar_t* Bt = Bm + (b * T + t) * N;
            const scalar_t* Ct = Cm + (b * T + t) * N;
            Vec sB(0), sA(0);
            for (int64_t n = 0; n < N; ++n) {
              const Vec gn = at::vec::fmadd(Vec(Ct[n]), gy, gs[n]);
              dCl[j * N + n] = at::vec::fmadd(gy, H[(j + 1) * N + n], dCl[j * N + n]);
              dBl[j * N + n] = at::vec::fmadd(gn, du, dBl[j * N + n]);
              sB = at::vec::fmadd(gn, Vec(Bt[n]), sB);
              const Vec a = Adec[j * N + n];
              const Vec s = gn * a * H[j * N + n];
              sA = at::vec::fmadd(s, load(At + n * Dn + d0, cnt), sA);
              dAv[n] = at::vec::fmadd(s, dl, dAv[n]);
              gs[n] = gn * a;
            }
            store(at::vec::fmadd(sB, dl, Dd * gy), du_out + off, cnt);
            store(at::vec::fmadd(sB, uu, sA), ddelta_out + off, cnt);
            dDv = at::vec::fmadd(gy, uu, dDv);
          }
          for (int64_t n = 0; n < N; ++n) {
            carry[k * N + n] = gs[n];
            dA_acc[k * N + n] = dAv[n];
          }
          dD_acc[k] = dDv;
        }
        // 3. reduce the vector partials of dB and dC over channels, once per chunk
        for (int64_t j = 0; j < L; ++j) {
          for (int64_t n = 0; n < N; ++n) {
            dBl[j * N + n].store(tmp);
            scalar_t sb = 0;
            for (int64_t l = 0; l < W; ++l) sb += tmp[l];
            dCl[j * N + n].store(tmp);
            scalar_t sc = 0;
            for (int64_t l = 0; l < W; ++l) sc += tmp[l];
            dBp[(t0 + j) * N + n] = sb;
            dCp[(t0 + j) * N + n] = sc;
          }
        }
      }
      for (int64_t k = 0; k < nb; ++k) {
        const int64_t d0 = (blk0 + k) * W, cnt = std::min(W, Dn - d0);
        scatter_state(carry.data() + k * N, N, cnt, dh0 + (b * Dn + d0) * N);
        for (int64_t n = 0; n < N; ++n) store(dA_acc[k * N + n], dA_part + (b * N + n) * Dn + d0, cnt);
        store(dD_acc[k], dD_part + b * Dn + d0, cnt);
      }
    }
  });
}

// u, delta [B, T, Dn], At [N, Dn], B, C [B, T, N], D [Dn]: every size the kernels index with.
void check_inputs(const char* op, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& At,
                  const at::Tensor& Bm, const at::Tensor& Cm, const at::Tensor& Dv) {
  using hybridssm::check_arg;
  hybridssm::check_float(op, "u", u);
  TORCH_CHECK(u.dim() == 3 && At.dim() == 2, op, ": u must be [B, T, Dn] and At [N, Dn], got ", u.sizes(),
              " and ", At.sizes());
  const int64_t Bsz = u.size(0), T = u.size(1), Dn = u.size(2), N = At.size(0);
  const auto dt = u.scalar_type();
  check_arg(op, "u", u, {Bsz, T, Dn}, dt);
  check_arg(op, "delta", delta, {Bsz, T, Dn}, dt);
  check_arg(op, "At", At, {N, Dn}, dt);
  check_arg(op, "B", Bm, {Bsz, T, N}, dt);
  check_arg(op, "C", Cm, {Bsz, T, N}, dt);
  check_arg(op, "D", Dv, {Dn}, dt);
}

// Returns (y [B, T, Dn], hT [B, Dn, N], checkpoints [B, nchunks, N, Dn] or empty).
std::vector<at::Tensor> scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& At,
                                 const at::Tensor& Bm, const at::Tensor& Cm, const at::Tensor& Dv,
                                 const at::Tensor& h0, bool save) {
  check_inputs("scan_fwd", u, delta, At, Bm, Cm, Dv);
  const int64_t Bsz = u.size(0), T = u.size(1), Dn = u.size(2), N = At.size(0);
  hybridssm::check_arg("scan_fwd", "h0", h0, {Bsz, Dn, N}, u.scalar_type());
  auto y = at::empty_like(u);
  auto hT = at::empty_like(h0);
  const int64_t nchunks = (T + kChunk - 1) / kChunk;
  auto ckpt = save ? at::empty({Bsz, nchunks, N, Dn}, u.options()) : at::empty({0}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "scan_fwd", [&] {
    auto fn = N == 16 ? scan_fwd_impl<scalar_t, 16> : scan_fwd_impl<scalar_t, 0>;
    fn(u.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), At.data_ptr<scalar_t>(),
       Bm.data_ptr<scalar_t>(), Cm.data_ptr<scalar_t>(), Dv.data_ptr<scalar_t>(),
       h0.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), hT.data_ptr<scalar_t>(),
       save ? ckpt.data_ptr<scalar_t>() : nullptr, Bsz, T, Dn, N);
  });
  return {y, hT, ckpt};
}

// Returns (du, ddelta, dAt [N, Dn], dB, dC, dD, dh0).
std::vector<at::Tensor> scan_bwd(const at::Tensor& dy, const at::Tensor& dhT, const at::Tensor& u,
                                 const at::Tensor& delta, const at::Tensor& At, const at::Tensor& Bm,
                                 const at::Tensor& Cm, const at::Tensor& Dv, const at::Tensor& ckpt) {
  check_inputs("scan_bwd", u, delta, At, Bm, Cm, Dv);
  const int64_t Bsz = u.size(0), T = u.size(1), Dn = u.size(2), N = At.size(0);
  hybridssm::check_arg("scan_bwd", "dy", dy, {Bsz, T, Dn}, u.scalar_type());
  hybridssm::check_arg("scan_bwd", "dhT", dhT, {Bsz, Dn, N}, u.scalar_type());
  hybridssm::check_saved("scan_bwd", "ckpt", ckpt, Bsz * ((T + kChunk - 1) / kChunk) * N * Dn, u.scalar_type());
  const int64_t W = u.scalar_type() == at::kFloat ? Vectorized<float>::size() : Vectorized<double>::size();
  const int64_t nblk = (Dn + W - 1) / W;
  // enough (batch, channel group) units to keep every thread busy when the batch is small
  const int64_t threads = at::get_num_threads();
  const int64_t G = std::max<int64_t>(1, std::min<int64_t>(nblk, (2 * threads + Bsz - 1) / Bsz));
  auto du = at::empty_like(u);
  auto ddelta = at::empty_like(u);
  auto dA_part = at::empty({Bsz, N, Dn}, u.options());
  auto dB_part = at::empty({G, Bsz, T, N}, u.options());
  auto dC_part = at::empty({G, Bsz, T, N}, u.options());
  auto dD_part = at::empty({Bsz, Dn}, u.options());
  auto dh0 = at::empty({Bsz, Dn, N}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "scan_bwd", [&] {
    auto fn = N == 16 ? scan_bwd_impl<scalar_t, 16> : scan_bwd_impl<scalar_t, 0>;
    fn(dy.data_ptr<scalar_t>(), dhT.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(),
       delta.data_ptr<scalar_t>(), At.data_ptr<scalar_t>(), Bm.data_ptr<scalar_t>(),
       Cm.data_ptr<scalar_t>(), Dv.data_ptr<scalar_t>(), ckpt.data_ptr<scalar_t>(),
       du.data_ptr<scalar_t>(), ddelta.data_ptr<scalar_t>(), dA_part.data_ptr<scalar_t>(),
       dB_part.data_ptr<scalar_t>(), dC_part.data_ptr<scalar_t>(), dD_part.data_ptr<scalar_t>(),
       dh0.data_ptr<scalar_t>(), Bsz, T, Dn, N, G);
  });
  auto dB = G == 1 ? dB_part.squeeze(0) : dB_part.sum(0);
  auto dC = G == 1 ? dC_part.squeeze(0) : dC_part.sum(0);
  return {du, ddelta, dA_part.sum(0), dB, dC, dD_part.sum(0), dh0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scan_fwd", &scan_fwd, "selective scan forward (CPU)");
  m.def("scan_bwd", &scan_bwd, "selective scan backward (CPU)");
}
