// Several frames of one mixer in one call, for the plan's prefill (plan.h: Hymba's meta tokens, the
// state every reset row restarts from, recomputed on every call since nothing derived from a weight is
// kept). Frame by frame, each frame's projections read every weight of the mixer again; here the
// frames' projections go together and only the recurrence runs frame by frame:
//
//   mamba:      xz = in_proj(all frames); u_t = conv(xz_t) frame by frame (the conv window);
//               dbc = x_proj(all u); y_t = update(xz_t, u_t, dbc_t) frame by frame (the SSM state);
//               out_proj(all y)
//   attention:  qkv = qkv_proj(all frames); frame by frame: the key and value into the cache, then
//               attention over the cache so far (attention_rows); o_proj(all outputs)
//
// The values are those of the frame-by-frame steps, bit for bit: every per-row part is the step's
// own building block (mamba.h, attention.h), and the projections (linear_frames) give each row the
// values of the step's own linear: at up to 4 rows a frame the step's linear_small gives each row
// gemv_rows' values (gemv_rows_multi), and so does linear_rows here for any number of frames; at more
// rows a frame, one linear_small per frame, as the step.
// Mixer kinds without an entry here run frame by frame (plan.h).
//
// An entry takes hn [T * B, d], frame-major (frame t is rows t * B .. t * B + B - 1), contiguous, the
// number of frames T, the mixer's spec and states (updated in place, as a step's), and pos [B] (each
// row's position before frame 0; neither entry here reads it: Mamba has no positions, attention keeps
// its own in its state); it returns the T frames' outputs [T * B, d_out], frame-major.

#pragma once

#include "attention.h"
#include "common.h"
#include "mamba.h"
#include "prefetch.h"

#include <cstring>
#include <string>
#include <vector>

namespace hybridssm::step {

using FramesFn = at::Tensor (*)(const at::Tensor& hn, int64_t T, const MixerSpec& m, at::Tensor* states,
                                const at::Tensor& pos);

// x [n, I] @ W^T (+ bias) -> [n, O] with each row's values those of gemv_rows on that row alone (so
// those of linear_small at up to 4 rows), the weight read from memory once for every row: W goes by
// blocks of gemv_rows' 8 rows (at most 8 I values, in L1 or L2), each block taken by every row of x in
// turn (a block's outputs are those of the whole call: gemv_rows computes each row of W alone). While
// the later rows compute from cache, the next block is asked for. W and bias in x's dtype, contiguous.
// At n = 4 this ran the Hymba prefill's projections ~2x faster than gemv_rows_multi<4, 2>, which
// reads only 2 rows of W at a time: too few streams to keep the memory busy.
inline at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& W, const at::Tensor& bias) {
  const int64_t n = x.size(0), I = x.size(1), O = W.size(0);
  const bool has_bias = present(bias);
  TORCH_CHECK(W.dim() == 2 && W.size(1) == I && W.is_contiguous() && W.scalar_type() == x.scalar_type() &&
                  (!has_bias || (bias.numel() == O && bias.is_contiguous() && bias.scalar_type() == x.scalar_type())),
              "hybridssm prefill: linear of input ", x.sizes(), " with weight ", W.sizes(), " does not fit");
  const auto xc = x.contiguous();
  auto y = at::empty({n, O}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "prefill_linear_rows", [&] {
    constexpr int64_t kBlock = 8;  // gemv_rows' rows per pass
    const scalar_t* w = W.data_ptr<scalar_t>();
    const scalar_t* b = has_bias ? bias.data_ptr<scalar_t>() : nullptr;
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t block_bytes = kBlock * I * static_cast<int64_t>(sizeof(scalar_t));
    for (int64_t o = 0; o < O; o += kBlock) {
      const int64_t rows = std::min(kBlock, O - o);
      for (int64_t j = 0; j < n; ++j) {
        if (j == 1 && o + kBlock < O) {
          const int64_t left = (O - o - kBlock) * I * static_cast<int64_t>(sizeof(scalar_t));
          prefetch_bytes(w + (o + kBlock) * I, std::min(block_bytes, left));
        }
        gemv_rows<scalar_t>(w + o * I, xp + j * I, b != nullptr ? b + o : nullptr, yp + j * O + o, rows, I);
      }
    }
  });
  return y;
}

// The prefill's linear of x [T * B, I], frame-major: at up to 4 rows a frame linear_rows (the values
// of the step's linear_small at that batch, each weight read once for every frame); beyond, one
// linear_small per frame, as the step (whose product then depends on the number of rows).
inline at::Tensor linear_frames(const at::Tensor& x, int64_t B, const at::Tensor& W, const at::Tensor& bias) {
  if (B <= 4) return linear_rows(x, W, bias);
  const int64_t rows = x.size(0);
  if (rows == B) return linear_small(x, W, bias);
  std::vector<at::Tensor> parts;
  for (int64_t r = 0; r < rows; r += B) parts.push_back(linear_small(x.narrow(0, r, B), W, bias));
  return at::cat(parts, 0);
}

inline at::Tensor mamba_frames(const at::Tensor& hn, int64_t T, const MixerSpec& m, at::Tensor* states,
                               const at::Tensor& /*pos*/) {
  const auto dt = hn.scalar_type();
  const int64_t B = hn.size(0) / T;
  const MambaDims d = mamba_dims(m, states, B, dt);
  const auto xz = linear_frames(hn, B, as_(m.w[0], dt), mamba_in_bias(m, dt)).contiguous();  // [T B, 2E]
  std::vector<at::Tensor> parts;
  for (int64_t t = 0; t < T; ++t) parts.push_back(mamba_conv(xz.narrow(0, t * B, B), m, d, states[0]));
  const auto u = at::cat(parts, 0);                                                         // [T B, E]
  const auto dbc = linear_frames(u, B, as_(m.w[3], dt), at::Tensor()).contiguous();        // [T B, R + 2N]
  mamba_inner_norms(dbc, m, d);
  const auto A = mamba_decay(m, d, hn.options());
  parts.clear();
  for (int64_t t = 0; t < T; ++t) {
    parts.push_back(mamba_update(xz.narrow(0, t * B, B), u.narrow(0, t * B, B), dbc.narrow(0, t * B, B), states[1],
                                 A, m, d));
  }
  return linear_frames(at::cat(parts, 0), B, as_(m.w[8], dt), mamba_out_bias(m, dt));
}

inline at::Tensor attention_frames(const at::Tensor& hn, int64_t T, const MixerSpec& m, at::Tensor* states,
                                   const at::Tensor& /*pos: the state's own*/) {
  using namespace attention_step;
  const auto dt = hn.scalar_type();
  const int64_t B = hn.size(0) / T, H = m.i[kHeads], D = m.i[kHeadDim];
  check_step(m, states, B, dt);
  // every frame fits before any is written (a full cache holds N slots): a refused prefill changes nothing
  const int64_t N = states[0].size(2);
  const int64_t* pos_p = states[2].data_ptr<int64_t>();
  for (int64_t b = 0; m.i[kWindow] == 0 && b < B; ++b) {
    TORCH_CHECK(pos_p[b] >= 0 && pos_p[b] + T <= N, "attention prefill: row ", b, " at position ", pos_p[b],
                " cannot take ", T, " more frames in a cache of ", N, " slots");
  }
  const auto qkv = linear_frames(hn, B, as_(m.w[kQkvW], dt), opt(m.w[kQkvB], dt).value_or(at::Tensor()))
                       .contiguous();  // [T B, (H + 2 Hkv) Dh]
  auto out = at::empty({T * B, H * D}, hn.options());
  for (int64_t t = 0; t < T; ++t) {
    auto q = qkv.narrow(0, t * B, B);
    auto o = out.narrow(0, t * B, B);
    AT_DISPATCH_FLOATING_TYPES(dt, "attention_prefill",
                               [&] { attention_rows<scalar_t>(m, q, states[0], states[1], states[2], o); });
  }
  return linear_frames(out, B, as_(m.w[kOW], dt), opt(m.w[kOB], dt).value_or(at::Tensor()));
}

// the several-frames entry of a mixer kind, or null (the plan then runs that mixer frame by frame)
inline FramesFn find_frames(const std::string& kind) {
  if (kind == "mamba") return mamba_frames;
  if (kind == "attention") return attention_frames;
  return nullptr;
}

// ---- a step whose restarted rows take a prefill's state, in the same products ---------------------
// A reset re-runs the prefill tokens (Hymba's meta tokens) for the restarted rows. Run apart, that
// pass reads every weight once more for T rows (~1.5 batch-1 steps per reset step, Hymba at 64 streams).
// Here the T frames of one fresh stream ride along with the step's B rows: each projection takes
// the B + T rows at once (each weight read once for both), then the frames' recurrences run on a
// fresh state of one row (conv and scan frame by frame, attention over the frames' keys), the
// restarted rows of the step's state take it, and only then the B rows' recurrences run.
//
// A restart entry takes hn [B + T, d] (the step's B rows, then the T frames of the fresh stream),
// the mixer's spec, its states [B, ...] (in place) and done (B flags: the rows that restart); the
// fresh stream starts from the mixer's state before any token (all zeros, as init_state's). It
// returns the outputs [B + T, d_out] in the same row order. pos as in a step (neither entry reads it).

using RestartFn = at::Tensor (*)(const at::Tensor& hn, int64_t B, const MixerSpec& m, at::Tensor* states,
                                 const bool* done, const at::Tensor& pos);

// The rows r of dst [B, ...] where done[r] take src [1, ...] (the same row shape and dtype, both
// contiguous): a restarted row's whole state, as a fresh one's.
inline void copy_row_where(const at::Tensor& dst, const at::Tensor& src, const bool* done) {
  const int64_t row = static_cast<int64_t>(src.nbytes());
  auto* out = static_cast<char*>(dst.data_ptr());
  const auto* in = static_cast<const char*>(src.data_ptr());
  for (int64_t r = 0; r < dst.size(0); ++r) {
    if (done[r]) std::memcpy(out + r * row, in, row);
  }
}

// x [B + T, I] @ W^T (+ bias): the step's B rows take the values of the step's own linear
// (linear_small of B rows) and the T rows those of a row alone. Where the step's B rows go through
// gemm_rows.h's kernel (its rows accumulate alone), the T rows join them in one product, each weight
// read once for both, in as many passes over W as the B rows alone take (the T rows widen each pass
// a little: 64 + 4 rows of Hymba's FFN down-projection took two passes, one more read of its 1 MB
// weight; and at B = 256 the B + T rows stay in that kernel). Elsewhere the two apart (the T rows
// by linear_rows, as the prefill of one stream).
inline at::Tensor linear_joint(const at::Tensor& x, int64_t B, const at::Tensor& W, const at::Tensor& bias) {
  const int64_t rows = x.size(0), I = x.size(1), O = W.size(0);
  if (!gemm_rows_takes(B, x, W, bias)) {
    return at::cat({linear_small(x.narrow(0, 0, B), W, bias), linear_rows(x.narrow(0, B, rows - B), W, bias)}, 0);
  }
  TORCH_CHECK(W.dim() == 2 && W.size(1) == I && (!present(bias) || bias.numel() == O),
              "hybridssm restart: linear of input ", x.sizes(), " with weight ", W.sizes(), " does not fit");
  const auto xc = x.contiguous();
  auto y = at::empty({rows, O}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "restart_linear_joint", [&] {
    gemm_rows_detail::gemm_nt<scalar_t>(xc.data_ptr<scalar_t>(), I, W.data_ptr<scalar_t>(),
                                        present(bias) ? bias.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
                                        O, rows, O, I, kGemmRowsPassBytes * rows / B);
  });
  return y;
}

inline at::Tensor mamba_restart(const at::Tensor& hn, int64_t B, const MixerSpec& m, at::Tensor* states,
                                const bool* done, const at::Tensor& /*pos*/) {
  const auto dt = hn.scalar_type();
  const int64_t T = hn.size(0) - B;
  const MambaDims d = mamba_dims(m, states, B, dt);
  at::Tensor fresh[2] = {at::zeros_like(states[0].narrow(0, 0, 1)), at::zeros_like(states[1].narrow(0, 0, 1))};
  const auto xz = linear_joint(hn, B, as_(m.w[0], dt), mamba_in_bias(m, dt)).contiguous();  // [B + T, 2E]
  std::vector<at::Tensor> u_parts(1);
  for (int64_t t = 0; t < T; ++t) u_parts.push_back(mamba_conv(xz.narrow(0, B + t, 1), m, d, fresh[0]));
  copy_row_where(states[0], fresh[0], done);
  u_parts[0] = mamba_conv(xz.narrow(0, 0, B), m, d, states[0]);
  const auto u = at::cat(u_parts, 0);                                                        // [B + T, E]
  const auto dbc = linear_joint(u, B, as_(m.w[3], dt), at::Tensor()).contiguous();           // [B + T, R + 2N]
  mamba_inner_norms(dbc, m, d);
  const auto A = mamba_decay(m, d, hn.options());
  std::vector<at::Tensor> y_parts(1);
  for (int64_t t = B; t < B + T; ++t) {
    y_parts.push_back(mamba_update(xz.narrow(0, t, 1), u.narrow(0, t, 1), dbc.narrow(0, t, 1), fresh[1], A, m, d));
  }
  copy_row_where(states[1], fresh[1], done);
  y_parts[0] = mamba_update(xz.narrow(0, 0, B), u.narrow(0, 0, B), dbc.narrow(0, 0, B), states[1], A, m, d);
  return linear_joint(at::cat(y_parts, 0), B, as_(m.w[8], dt), mamba_out_bias(m, dt));
}

// The rows r of a cache dst [B, Hkv, N, Dh] where done[r] take a fresh row's src [1, Hkv, n, Dh] in
// their first n <= N slots and zeros in the others (a fresh full cache's slots past its tokens).
inline void copy_cache_row_where(const at::Tensor& dst, const at::Tensor& src, const bool* done) {
  const int64_t B = dst.size(0), Hkv = dst.size(1), N = dst.size(2), n = src.size(2);
  const int64_t slot = dst.size(3) * static_cast<int64_t>(dst.element_size());
  auto* out = static_cast<char*>(dst.data_ptr());
  const auto* in = static_cast<const char*>(src.data_ptr());
  for (int64_t r = 0; r < B; ++r) {
    if (!done[r]) continue;
    for (int64_t h = 0; h < Hkv; ++h) {
      char* head = out + (r * Hkv + h) * N * slot;
      std::memcpy(head, in + h * n * slot, n * slot);
      std::memset(head + n * slot, 0, (N - n) * slot);
    }
  }
}

inline at::Tensor attention_restart(const at::Tensor& hn, int64_t B, const MixerSpec& m, at::Tensor* states,
                                    const bool* done, const at::Tensor& /*pos*/) {
  using namespace attention_step;
  const auto dt = hn.scalar_type();
  const int64_t T = hn.size(0) - B, H = m.i[kHeads], D = m.i[kHeadDim];
  check_step(m, states, B, dt);
  // The fresh stream's cache: a full cache keeps the T tokens' keys in its first slots (slot =
  // position), so its scratch needs only those and one more (a full cache has more slots than
  // prefix tokens), not the whole max_len of zeros, and the restarted rows take zeros past them
  // (with a window, the ring's slots depend on its size: the whole cache).
  const int64_t N = states[0].size(2), P = m.i[kPrefix];
  const int64_t n = m.i[kWindow] == 0 ? std::min(N, std::max(T, P) + 1) : N;
  const auto& ck = states[0];
  at::Tensor fresh[3] = {at::zeros({1, ck.size(1), n, ck.size(3)}, ck.options()),
                         at::zeros({1, ck.size(1), n, ck.size(3)}, ck.options()), at::zeros({1}, states[2].options())};
  check_step(m, fresh, 1, dt);
  const auto qkv = linear_joint(hn, B, as_(m.w[kQkvW], dt), opt(m.w[kQkvB], dt).value_or(at::Tensor()))
                       .contiguous();  // [B + T, (H + 2 Hkv) Dh]
  auto out = at::empty({B + T, H * D}, hn.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "attention_restart", [&] {
    for (int64_t t = B; t < B + T; ++t) {
      auto q = qkv.narrow(0, t, 1);
      auto o = out.narrow(0, t, 1);
      attention_rows<scalar_t>(m, q, fresh[0], fresh[1], fresh[2], o);
    }
    copy_cache_row_where(states[0], fresh[0], done);
    copy_cache_row_where(states[1], fresh[1], done);
    copy_row_where(states[2], fresh[2], done);
    auto q = qkv.narrow(0, 0, B);
    auto o = out.narrow(0, 0, B);
    attention_rows<scalar_t>(m, q, states[0], states[1], states[2], o);
  });
  return linear_joint(out, B, as_(m.w[kOW], dt), opt(m.w[kOB], dt).value_or(at::Tensor()));
}

// the restart entry of a mixer kind, or null (the plan then has no restarting step)
inline RestartFn find_restart(const std::string& kind) {
  if (kind == "mamba") return mamba_restart;
  if (kind == "attention") return attention_restart;
  return nullptr;
}

}  // namespace hybridssm::step
