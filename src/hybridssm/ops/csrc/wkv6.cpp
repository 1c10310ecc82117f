// Fused CPU RWKV-6 WKV recurrence, forward and backward.
//
//   o_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T)          per head; S is a K x V matrix
//   S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T            w = log decay (<= 0)
//
// Layouts (all contiguous): r, k, w [B, T, H, K]; v, o [B, T, H, V]; u [H, K]; s0, sT [B, H, K, V].
// Checkpoints (internal) [B, H, nchunks, K, V]: the state before each chunk of kChunk steps.
//
// Work is split over (batch, head) with at::parallel_for. Each unit keeps its state in a small
// buffer (K x Vp, Vp = V rounded up to the SIMD width, tail lanes zero) and walks the sequence:
// every step is a rank-1 update and a vector-matrix product, vectorised over V. The bonus term
// is one scalar, r_t . (u * k_t), times v_t.
//
// Backward: for each chunk, last to first, recompute the chunk's states from its checkpoint, then
// run the adjoint recurrence dS_{t-1} = diag(exp(w_t)) dS_t + r_t do_t^T backwards through it.
// Every gradient is formed directly from S_{t-1} and dS_t, without dividing by decays or
// cancelling cumulative sums, so it is exact to rounding whatever the decays:
//   dr_t = S_{t-1} do_t + u * k_t (do_t . v_t)
//   dk_t = dS_t v_t + u * r_t (do_t . v_t)
//   dv_t = dS_t^T k_t + (r_t . (u * k_t)) do_t
//   dw_t = exp(w_t) * rowsum(dS_t * S_{t-1})           (the gradient of the log decay)
//   du  += r_t * k_t (do_t . v_t)
//
// The build defines CPU_CAPABILITY (AVX2 / AVX512) so that at::vec uses real SIMD code.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include "checks.h"
#include "vec_helpers.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

using at::vec::Vectorized;
using hybridssm::load;
using hybridssm::store;
using hybridssm::hsum;

constexpr int64_t kChunk = 32;  // backward recompute interval (steps per checkpoint)

// Padded [K, Vp] buffer <-> a [K, V] slice of a contiguous tensor.
template <typename scalar_t>
inline void load_state(const scalar_t* src, scalar_t* dst, int64_t K, int64_t V, int64_t Vp) {
  for (int64_t k = 0; k < K; ++k) {
    std::memcpy(dst + k * Vp, src + k * V, V * sizeof(scalar_t));
    std::fill(dst + k * Vp + V, dst + (k + 1) * Vp, scalar_t(0));
  }
}

template <typename scalar_t>
inline void save_state(const scalar_t* src, scalar_t* dst, int64_t K, int64_t V, int64_t Vp) {
  for (int64_t k = 0; k < K; ++k) std::memcpy(dst + k * V, src + k * Vp, V * sizeof(scalar_t));
}

// One step of the recurrence on a padded state: S <- diag(ew) S + k v^T; returns nothing.
// When `o` is given, also writes o = r^T S_prev + bonus * v (before the update).
template <typename scalar_t>
inline void step(const scalar_t* rt, const scalar_t* kt, const scalar_t* ew, const scalar_t* vt,
                 scalar_t bonus, const scalar_t* S_in, scalar_t* S_out, scalar_t* ot, int64_t K,
                 int64_t V, int64_t Vp) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  for (int64_t v0 = 0; v0 < Vp; v0 += W) {
    const int64_t cnt = std::min(W, V - v0);
    const Vec vv = load(vt + v0, cnt);
    Vec acc = Vec(bonus) * vv;
    for (int64_t k = 0; k < K; ++k) {
      const Vec s = Vec::loadu(S_in + k * Vp + v0);
      if (ot != nullptr) acc = at::vec::fmadd(Vec(rt[k]), s, acc);
      at::vec::fmadd(Vec(ew[k]), s, Vec(kt[k]) * vv).store(S_out + k * Vp + v0);
    }
    if (ot != nullptr) store(acc, ot + v0, cnt);
  }
}

template <typename scalar_t>
void fwd_impl(const scalar_t* r, const scalar_t* kk, const scalar_t* v, const scalar_t* w,
              const scalar_t* u, const scalar_t* s0, scalar_t* o, scalar_t* sT, scalar_t* ckpt,
              int64_t Bsz, int64_t T, int64_t H, int64_t K, int64_t V) {
  constexpr int64_t W = Vectorized<scalar_t>::size();
  const int64_t Vp = (V + W - 1) / W * W;
  const int64_t nchunks = (T + kChunk - 1) / kChunk;
  at::parallel_for(0, Bsz * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> S(K * Vp), ew(K);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H;
      const scalar_t* uh = u + h * K;
      load_state(s0 + i * K * V, S.data(), K, V, Vp);
      for (int64_t t = 0; t < T; ++t) {
        if (ckpt != nullptr && t % kChunk == 0) {
          save_state(S.data(), ckpt + (i * nchunks + t / kChunk) * K * V, K, V, Vp);
        }
        const int64_t rk = ((b * T + t) * H + h) * K, rv = ((b * T + t) * H + h) * V;
        scalar_t bonus = 0;
        for (int64_t k = 0; k < K; ++k) {
          bonus += r[rk + k] * uh[k] * kk[rk + k];
          ew[k] = std::exp(w[rk + k]);
        }
        step(r + rk, kk + rk, ew.data(), v + rv, bonus, S.data(), S.data(), o + rv, K, V, Vp);
      }
      save_state(S.data(), sT + i * K * V, K, V, Vp);
    }
  });
}

template <typename scalar_t>
void bwd_impl(const scalar_t* dout, const scalar_t* dsT, const scalar_t* r, const scalar_t* kk,
              const scalar_t* v, const scalar_t* w, const scalar_t* u, const scalar_t* ckpt,
              scalar_t* dr, scalar_t* dk, scalar_t* dv, scalar_t* dw, scalar_t* du_part,
              scalar_t* ds0, int64_t Bsz, int64_t T, int64_t H, int64_t K, int64_t V) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const int64_t Vp = (V + W - 1) / W * W, nv = Vp / W;
  const int64_t nchunks = (T + kChunk - 1) / kChunk;
  at::parallel_for(0, Bsz * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> Sbuf((kChunk + 1) * K * Vp), ewbuf(kChunk * K), dS(K * Vp), du(K);
    std::vector<scalar_t> dob(Vp), vb(Vp), dvb(Vp);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H;
      const scalar_t* uh = u + h * K;
      load_state(dsT + i * K * V, dS.data(), K, V, Vp);
      std::fill(du.begin(), du.end(), scalar_t(0));
      for (int64_t c = nchunks - 1; c >= 0; --c) {
        const int64_t t0 = c * kChunk, L = std::min(kChunk, T - t0);
        // 1. the chunk's states: Sbuf[j] = S_{t0 + j - 1}
        load_state(ckpt + (i * nchunks + c) * K * V, Sbuf.data(), K, V, Vp);
        for (int64_t j = 0; j < L; ++j) {
          const int64_t rk = ((b * T + t0 + j) * H + h) * K, rv = ((b * T + t0 + j) * H + h) * V;
          scalar_t* ew = ewbuf.data() + j * K;
          for (int64_t k = 0; k < K; ++k) ew[k] = std::exp(w[rk + k]);
          step<scalar_t>(nullptr, kk + rk, ew, v + rv, 0, Sbuf.data() + j * K * Vp,
                         Sbuf.data() + (j + 1) * K * Vp, nullptr, K, V, Vp);
        }
        // 2. the adjoint recurrence backwards through the chunk
        for (int64_t j = L - 1; j >= 0; --j) {
          const int64_t t = t0 + j;
          const int64_t rk = ((b * T + t) * H + h) * K, rv = ((b * T + t) * H + h) * V;
          const scalar_t *rt = r + rk, *kt = kk + rk, *ew = ewbuf.data() + j * K;
          const scalar_t* Sprev = Sbuf.data() + j * K * Vp;
          // (the tail lanes past V were zeroed at allocation and are never written)
          std::memcpy(dob.data(), dout + rv, V * sizeof(scalar_t));
          std::memcpy(vb.data(), v + rv, V * sizeof(scalar_t));
          scalar_t pv = 0, bonus = 0;
          for (int64_t x = 0; x < V; ++x) pv += dob[x] * vb[x];
          for (int64_t k = 0; k < K; ++k) bonus += rt[k] * uh[k] * kt[k];
          for (int64_t q = 0; q < nv; ++q) (Vec(bonus) * Vec::loadu(dob.data() + q * W)).store(dvb.data() + q * W);
          for (int64_t k = 0; k < K; ++k) {
            Vec dr_acc(0), dw_acc(0), dk_acc(0);
            const Vec rk_(rt[k]), kk_(kt[k]), ew_(ew[k]);
            scalar_t* dSk = dS.data() + k * Vp;
            const scalar_t* Sk = Sprev + k * Vp;
            for (int64_t q = 0; q < nv; ++q) {
              const Vec d = Vec::loadu(dSk + q * W), sp = Vec::loadu(Sk + q * W);
              const Vec g = Vec::loadu(dob.data() + q * W), vv = Vec::loadu(vb.data() + q * W);
              dr_acc = at::vec::fmadd(g, sp, dr_acc);
              dw_acc = at::vec::fmadd(d, sp, dw_acc);
              dk_acc = at::vec::fmadd(d, vv, dk_acc);
              at::vec::fmadd(kk_, d, Vec::loadu(dvb.data() + q * W)).store(dvb.data() + q * W);
              at::vec::fmadd(ew_, d, rk_ * g).store(dSk + q * W);
            }
            dr[rk + k] = hsum(dr_acc) + uh[k] * kt[k] * pv;
            dk[rk + k] = hsum(dk_acc) + uh[k] * rt[k] * pv;
            dw[rk + k] = ew[k] * hsum(dw_acc);
            du[k] += rt[k] * kt[k] * pv;
          }
          std::memcpy(dv + rv, dvb.data(), V * sizeof(scalar_t));
        }
      }
      save_state(dS.data(), ds0 + i * K * V, K, V, Vp);
      std::memcpy(du_part + i * K, du.data(), K * sizeof(scalar_t));
    }
  });
}

// r, k, w [B, T, H, K], v [B, T, H, V], u [H, K]: every size the kernels index with.
void check_inputs(const char* op, const at::Tensor& r, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& w, const at::Tensor& u) {
  using hybridssm::check_arg;
  hybridssm::check_float(op, "r", r);
  TORCH_CHECK(r.dim() == 4 && v.dim() == 4, op, ": r must be [B, T, H, K] and v [B, T, H, V], got ", r.sizes(),
              " and ", v.sizes());
  const int64_t Bsz = r.size(0), T = r.size(1), H = r.size(2), K = r.size(3), V = v.size(3);
  const auto d = r.scalar_type();
  check_arg(op, "r", r, {Bsz, T, H, K}, d);
  check_arg(op, "k", k, {Bsz, T, H, K}, d);
  check_arg(op, "v", v, {Bsz, T, H, V}, d);
  check_arg(op, "w", w, {Bsz, T, H, K}, d);
  check_arg(op, "u", u, {H, K}, d);
}

// Returns (o [B, T, H, V], sT [B, H, K, V], checkpoints [B, H, nchunks, K, V] or empty).
std::vector<at::Tensor> wkv6_fwd(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& w, const at::Tensor& u, const at::Tensor& s0,
                                 bool save) {
  check_inputs("wkv6_fwd", r, k, v, w, u);
  const int64_t Bsz = r.size(0), T = r.size(1), H = r.size(2), K = r.size(3), V = v.size(3);
  hybridssm::check_arg("wkv6_fwd", "s0", s0, {Bsz, H, K, V}, r.scalar_type());
  auto o = at::empty({Bsz, T, H, V}, r.options());
  auto sT = at::empty({Bsz, H, K, V}, r.options());
  const int64_t nchunks = (T + kChunk - 1) / kChunk;
  auto ckpt = save ? at::empty({Bsz, H, nchunks, K, V}, r.options()) : at::empty({0}, r.options());
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "wkv6_fwd", [&] {
    fwd_impl<scalar_t>(r.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                       w.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), s0.data_ptr<scalar_t>(),
                       o.data_ptr<scalar_t>(), sT.data_ptr<scalar_t>(),
                       save ? ckpt.data_ptr<scalar_t>() : nullptr, Bsz, T, H, K, V);
  });
  return {o, sT, ckpt};
}

// Returns (dr, dk, dv, dw, du [H, K], ds0).
std::vector<at::Tensor> wkv6_bwd(const at::Tensor& dout, const at::Tensor& dsT, const at::Tensor& r,
                                 const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                                 const at::Tensor& u, const at::Tensor& ckpt) {
  check_inputs("wkv6_bwd", r, k, v, w, u);
  const int64_t Bsz = r.size(0), T = r.size(1), H = r.size(2), K = r.size(3), V = v.size(3);
  const int64_t nchunks = (T + kChunk - 1) / kChunk;
  hybridssm::check_arg("wkv6_bwd", "dout", dout, {Bsz, T, H, V}, r.scalar_type());
  hybridssm::check_arg("wkv6_bwd", "dsT", dsT, {Bsz, H, K, V}, r.scalar_type());
  hybridssm::check_saved("wkv6_bwd", "ckpt", ckpt, Bsz * H * nchunks * K * V, r.scalar_type());
  auto dr = at::empty_like(r), dk = at::empty_like(k), dv = at::empty_like(v), dw = at::empty_like(w);
  auto du_part = at::empty({Bsz, H, K}, r.options());
  auto ds0 = at::empty({Bsz, H, K, V}, r.options());
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "wkv6_bwd", [&] {
    bwd_impl<scalar_t>(dout.data_ptr<scalar_t>(), dsT.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(),
                       k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                       u.data_ptr<scalar_t>(), ckpt.data_ptr<scalar_t>(), dr.data_ptr<scalar_t>(),
                       dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(),
                       du_part.data_ptr<scalar_t>(), ds0.data_ptr<scalar_t>(), Bsz, T, H, K, V);
  });
  return {dr, dk, dv, dw, du_part.sum(0), ds0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("wkv6_fwd", &wkv6_fwd, "RWKV-6 WKV forward (CPU)");
  m.def("wkv6_bwd", &wkv6_bwd, "RWKV-6 WKV backward (CPU)");
}
