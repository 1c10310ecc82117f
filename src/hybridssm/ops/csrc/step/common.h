// The streaming step's C++ contract: one frame (T = 1) of a sequence mixer, no autograd.
//
// A *mixer step* is a function registered under the mixer's kind ("mamba", "attention", "gru", ...):
//
//   at::Tensor fn(const at::Tensor& x, const MixerSpec& m, at::Tensor* states, const at::Tensor& pos)
//
//   x       [B, d], contiguous, in the compute dtype: the block's (normed) input for this frame
//   m       the mixer's weights (m.w, in the order of its Python NamedTuple; an empty tensor stands for
//           an absent one, e.g. no bias), integer options (m.i) and float options (m.f)
//   states  the mixer's state tensors in the order of its state NamedTuple's fields, contiguous,
//           updated IN PLACE (the caller clones them first for a functional step)
//   pos     [B] int64: each row's model-level input position before this frame (not yet advanced)
//   returns y [B, d_out] (a new tensor) in x's dtype
//
// Weights are held as the parameters themselves (the at::Tensor shares the Parameter's TensorImpl),
// so writes through .data, copy_, load_state_dict or an optimizer are seen by the next step:
// nothing derived from a weight (such as -exp(A_log)) may be kept across calls.
//
// ATen calls made from C++ cost ~1-2 us each (no Python); calling the same ATen op as the eager
// forward (at::layer_norm, at::gelu, ...) reproduces its values. Hand-written loops are for chains
// of small element-wise work. Kernels must TORCH_CHECK every size they rely on.

#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "../vec_helpers.h"
#include "aten_exp.h"
#include "gemm_rows.h"

#include <algorithm>
#include <map>
#include <string>
#include <vector>

namespace hybridssm::step {

using at::vec::Vectorized;

struct MixerSpec {
  std::vector<at::Tensor> w;  // weights (empty tensor = absent)
  std::vector<int64_t> i;     // integer options
  std::vector<double> f;      // float options
};

using MixerFn = at::Tensor (*)(const at::Tensor& x, const MixerSpec& m, at::Tensor* states,
                               const at::Tensor& pos);

// A registered kernel and how many state tensors it reads and writes (checked before every call
// from Python and when a plan is built: a kernel indexes its states without bounds checks).
struct MixerKernel {
  MixerFn fn = nullptr;
  int64_t n_states = 0;
};

inline std::map<std::string, MixerKernel>& mixer_registry() {
  static std::map<std::string, MixerKernel> table;
  return table;
}

struct MixerRegistration {
  MixerRegistration(const char* kind, MixerFn fn, int64_t n_states) {
    mixer_registry()[kind] = MixerKernel{fn, n_states};
  }
};

// HYBRIDSSM_MIXER_STEP(mamba, mamba_mixer_step, 2) registers a mixer step under the kind "mamba",
// reading the 2 tensors of its state (the fields of its state NamedTuple, in order).
#define HYBRIDSSM_MIXER_STEP(kind, fn, n_states) \
  static ::hybridssm::step::MixerRegistration hybridssm_mixer_step_##kind(#kind, fn, n_states)

// The kernel of `kind`, after checking that it is given `n_states` state tensors.
inline MixerFn find_mixer(const std::string& kind, int64_t n_states) {
  auto it = mixer_registry().find(kind);
  TORCH_CHECK(it != mixer_registry().end(), "hybridssm step: no fused step for mixer kind '", kind, "'");
  TORCH_CHECK(n_states == it->second.n_states, "hybridssm step: mixer kind '", kind, "' takes ",
              it->second.n_states, " state tensors, got ", n_states);
  return it->second.fn;
}

// ---- small helpers shared by the step kernels -------------------------------------------------

// A weight in the compute dtype, contiguous: the tensor itself when it already is (no copy).
inline at::Tensor as_(const at::Tensor& t, at::ScalarType dt) {
  return t.scalar_type() == dt && t.is_contiguous() ? t : t.to(dt).contiguous();
}

inline bool present(const at::Tensor& t) { return t.defined() && t.numel() > 0; }

// w [rows, cols] (row-major) transposed into a new buffer [cols, rows]: a weight read input-major by
// a product over many rows (conv taps, Mamba's dt projection). Built per call, never kept: a weight
// may change between calls.
template <typename scalar_t>
std::vector<scalar_t> transposed(const scalar_t* w, int64_t rows, int64_t cols) {
  std::vector<scalar_t> wt(rows * cols);
  for (int64_t j = 0; j < cols; ++j) {
    for (int64_t i = 0; i < rows; ++i) wt[j * rows + i] = w[i * cols + j];
  }
  return wt;
}

inline std::optional<at::Tensor> opt(const at::Tensor& t, at::ScalarType dt) {
  return present(t) ? std::optional<at::Tensor>(as_(t, dt)) : std::nullopt;
}

template <typename scalar_t>
inline scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  Vec acc(0);
  int64_t i = 0;
  for (; i + W <= n; i += W) acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
  if (i < n) acc = at::vec::fmadd(Vec::loadu(a + i, n - i), Vec::loadu(b + i, n - i), acc);
  return hybridssm::hsum(acc);
}

// A software prefetch cursor over a weight read front to back in blocks (a GEMV's kRows rows, a
// vector-matrix product's four input rows): before each block's pass, start(block, bytes, passes)
// aims it kWeightAhead bytes past the block's start, and each of the pass's `passes` steps asks for
// the next lines, so that it moves one block ahead over the pass, in address order. On the
// transformer step's 12.6 MB of weights (this machine, loaded), the hardware prefetcher alone kept
// the batch-1 GEMV at 65-80% of a plain sum over the same bytes, the cursor at 85-95% (prefetching
// each next row apart, not in address order, gained nothing). A hint: it never faults, values are
// untouched, and it stops at the weight's end.
class WeightAhead {
 public:
  static constexpr int64_t kWeightAhead = 8192;
  static constexpr int64_t kLine = 64;

  WeightAhead(const void* begin, int64_t bytes) : end_(static_cast<const char*>(begin) + bytes) {}

  void start(const void* block, int64_t block_bytes, int64_t passes) {
    next_ = static_cast<const char*>(block) + kWeightAhead;
    stop_ = std::min(next_ + block_bytes, end_);
    const int64_t lines = (block_bytes + kLine - 1) / kLine;
    per_ = (lines + std::max<int64_t>(passes, 1) - 1) / std::max<int64_t>(passes, 1);
  }

  inline void step() {
    for (int64_t q = 0; q < per_ && next_ < stop_; ++q, next_ += kLine) __builtin_prefetch(next_, 0, 3);
  }

 private:
  const char* end_;
  const char* next_ = nullptr;
  const char* stop_ = nullptr;
  int64_t per_ = 0;
};

// Weights beyond this many bytes are read from memory at every step: they do not stay in the caches
// from one step to the next (L2 1 MiB a core; L3 32 MiB, shared with whatever else runs).
constexpr int64_t kStreamedWeightBytes = int64_t(8) << 20;

// Whether the weights of the step running on this thread come from memory (a plan whose weights
// exceed kStreamedWeightBytes, plan.h): linear_small's batch-1 GEMV then reads fewer rows at a time
// (gemv_rows). Set for a scope by StreamedWeights; false elsewhere.
inline bool& weights_streamed() {
  thread_local bool streamed = false;
  return streamed;
}

class StreamedWeights {
 public:
  explicit StreamedWeights(bool streamed) : saved_(weights_streamed()) { weights_streamed() = streamed; }
  ~StreamedWeights() { weights_streamed() = saved_; }
  StreamedWeights(const StreamedWeights&) = delete;
  StreamedWeights& operator=(const StreamedWeights&) = delete;

 private:
  bool saved_;
};

// y[o] = W[o, :] . x (+ bias[o]) for o < O over a row-major W [O, I], kRows rows at a time so that
// kRows independent FMA chains hide the FMA latency and each load of x serves kRows rows. At batch 1
// this streams the weights faster than a GEMM call (whose M = 1 path is tuned for larger M): a step
// is bound by reading its weights once (WeightAhead keeps the read near the memory's rate).
// Each output is its row's dot product alone (one vector accumulator over the input in order, then
// the tail, the horizontal sum and the bias), so the values do not depend on kRows.
//
// kRows: 8 for weights that stay in cache; weights read from memory go to gemv_streams below (linear_into
// picks by weights_streamed()). Measured before gemv_streams, on this machine (2 cores shared with other
// jobs, load 2.5-5), the batch-1 step with the two switched at run time step by step in one process, median
// of the paired ratios over 300-400 steps: 4 rows took 0.90-0.95x of 8 rows' step on the models whose weights
// come from memory (transformer 12.6 MB 0.91x twice, hybrid / hybrid[gru] / hybrid[delta_net] 0.90x, hymba
// 0.95-0.96x, hybrid[griffin_lru] 0.95x, hybrid[gated_ssm] 0.95x, hybrid[rwkv] 0.95x
// and 1.04x, ss_transformer 1.01x twice) but 1.01-1.05x on those whose weights stay in cache
// (mamba, mamba2, gated_ssm: 3.3-5.5 MB), where 8 chains compute faster. The GEMVs alone over a
// model's weights in step order (time over a plain 4-accumulator read of the same bytes): 8 rows
// 1.24-1.39x, 4 rows 1.06-1.26x; fewer streams at once keep the hardware prefetcher ahead.
// Tried and not kept: 2 rows (1.0-1.2x the read from memory, latency-bound
// in cache: mamba 1.39x), 3 rows (between 2 and 4), 16 rows (worse), the WeightAhead cursor 4 or
// 16 KB ahead instead of 8 (no better), a lead-in burst over the first 8 KB (mixed, within noise),
// prefetching the next block's rows column by column (worse), non-temporal (NTA) and L2-only (T1)
// prefetch hints with 4 rows (the step 0.94-1.10x of the plain hint's, no consistent gain: keeping
// the weights out of the caches did not speed up the step's other work).
template <typename scalar_t, int kRows = 8>
void gemv_rows(const scalar_t* W, const scalar_t* x, const scalar_t* bias, scalar_t* y, int64_t O,
               int64_t I) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t Wd = Vec::size();
  const int64_t row_bytes = I * static_cast<int64_t>(sizeof(scalar_t));
  WeightAhead ahead(W, O * row_bytes);
  int64_t o = 0;
  for (; o + kRows <= O; o += kRows) {
    ahead.start(W + o * I, kRows * row_bytes, I / Wd);
    Vec acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = Vec(0);
    int64_t i = 0;
    for (; i + Wd <= I; i += Wd) {
      ahead.step();
      const Vec xv = Vec::loadu(x + i);
      for (int r = 0; r < kRows; ++r) acc[r] = at::vec::fmadd(Vec::loadu(W + (o + r) * I + i), xv, acc[r]);
    }
    if (i < I) {
      const Vec xv = Vec::loadu(x + i, I - i);
      for (int r = 0; r < kRows; ++r) {
        acc[r] = at::vec::fmadd(Vec::loadu(W + (o + r) * I + i, I - i), xv, acc[r]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      y[o + r] = hybridssm::hsum(acc[r]) + (bias != nullptr ? bias[o + r] : scalar_t(0));
    }
  }
  for (; o < O; ++o) y[o] = dot(W + o * I, x, I) + (bias != nullptr ? bias[o] : scalar_t(0));
}

// gemv_rows for weights read from memory: kStreams rows at a time, one from each of kStreams equal
// parts of W (rows o, o + Q, o + 2Q, ... with Q = O / kStreams), so that the read is kStreams
// sequential streams far apart instead of one: the hardware prefetcher runs ahead on each, and a
// single core keeps more lines in flight. Each stream also asks for the line kStreamAhead bytes
// ahead of it. The rows left over (O mod kStreams) are single dot products. Each output is its
// row's dot product alone, as in gemv_rows: the values are gemv_rows' bit for bit. Two to four input
// rows (a small batch) read W the same way (gemv_streams_multi: fewer streams as the accumulators grow).
// Measured on this machine (AMD EPYC, 31 MB of step-shaped matrices, cold, a C++ harness): 16.3-18.8
// GB/s against gemv_rows<4>'s 12.1-13.3 (the 4 consecutive rows are one stream to the prefetcher;
// a plain one-stream sum reads 10.8-11.7, four streams 15.6-16.5); 8 streams 15.7-18.3, 2 streams of
// 2 rows 11.0-11.7, 4 streams of 2 rows 11.2-12.4. In the steps (the two GEMVs switched every 25
// steps in one process, median of 20 paired ratios, load 3): ss_transformer 1.49x, hymba 1.43x,
// hybrid[rwkv] 1.45x, hybrid[griffin_lru] 1.44x, transformer 1.35x, hybrid[gated_ssm] 1.30x, hybrid
// 1.17x faster than with gemv_rows<4>: more than the GEMV's own gain alone would give (~1.2x at
// two thirds of the step), not explained yet (perhaps the one stream's prefetcher starting cold
// after each of the step's other passes). Idle (load 1), with the accumulators in registers (see
// gemv_streams): ss_transformer 1.46x, hybrid[rwkv] 1.36x, hymba 1.26x (weights from memory), and
// transformer 1.09x, hybrid 1.06x, hybrid[gru] 1.03x (12-13 MB: from the L3 when the machine idles).
constexpr int kStreams = 4;
constexpr int64_t kStreamAhead = 1024;

// gemv_streams for NX input rows at once (x row j at x + j * ldx, y row j at y + j * ldy) and S
// streams: each weight row is loaded once for the NX rows (as gemv_rows_multi), S * NX accumulators
// in registers (gemv_streams below is the one-row case).
template <typename scalar_t, int NX, int S>
[[gnu::noinline]] void gemv_streams_multi(const scalar_t* W, const scalar_t* x, int64_t ldx, const scalar_t* bias,
                                          scalar_t* y, int64_t ldy, int64_t O, int64_t I) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t Wd = Vec::size();
  constexpr int64_t kAhead = kStreamAhead / static_cast<int64_t>(sizeof(scalar_t));
  const int64_t Q = O / S;
  const int64_t Iv = I / Wd * Wd;  // the whole vectors of a row
  // The accumulators stay in registers only when every index is a constant after unrolling: the
  // loops over s and j are unrolled by the pragma, the result written without taking an address.
  for (int64_t o = 0; o < Q; ++o) {
    const scalar_t* w0 = W + o * I;  // stream s reads row s * Q + o: w0 + s * Q * I
    const int64_t stride = Q * I;
    Vec acc[S][NX];
#pragma GCC unroll 16
    for (int s = 0; s < S; ++s) {
#pragma GCC unroll 16
      for (int j = 0; j < NX; ++j) acc[s][j] = Vec(0);
    }
    for (int64_t i = 0; i < Iv; i += Wd) {
      Vec xv[NX];
#pragma GCC unroll 16
      for (int j = 0; j < NX; ++j) xv[j] = Vec::loadu(x + j * ldx + i);
#pragma GCC unroll 16
      for (int s = 0; s < S; ++s) {
        const scalar_t* p = w0 + s * stride + i;
        __builtin_prefetch(p + kAhead, 0, 3);  // a hint per vector: cheap beside the load it precedes
        const Vec w = Vec::loadu(p);
#pragma GCC unroll 16
        for (int j = 0; j < NX; ++j) acc[s][j] = at::vec::fmadd(w, xv[j], acc[s][j]);
      }
    }
    if (Iv < I) {
      Vec xv[NX];
#pragma GCC unroll 16
      for (int j = 0; j < NX; ++j) xv[j] = Vec::loadu(x + j * ldx + Iv, I - Iv);
#pragma GCC unroll 16
      for (int s = 0; s < S; ++s) {
        const Vec w = Vec::loadu(w0 + s * stride + Iv, I - Iv);
#pragma GCC unroll 16
        for (int j = 0; j < NX; ++j) acc[s][j] = at::vec::fmadd(w, xv[j], acc[s][j]);
      }
    }
#pragma GCC unroll 16
    for (int s = 0; s < S; ++s) {
      const int64_t row = s * Q + o;
      const scalar_t b = bias != nullptr ? bias[row] : scalar_t(0);
#pragma GCC unroll 16
      for (int j = 0; j < NX; ++j) y[j * ldy + row] = hybridssm::hsum(acc[s][j]) + b;
    }
  }
  for (int64_t o = S * Q; o < O; ++o) {
    for (int j = 0; j < NX; ++j) {
      y[j * ldy + o] = dot(W + o * I, x + j * ldx, I) + (bias != nullptr ? bias[o] : scalar_t(0));
    }
  }
}

// NX = 1 apart: with a [S][1] accumulator array GCC kept the accumulators on the stack (a store and
// a load in every FMA's chain: the step's GEMV 1.5x slower from the L3); a flat array stays in
// registers. Both are kept out of line, so that no caller's registers crowd the accumulators out.
template <typename scalar_t>
[[gnu::noinline]] void gemv_streams(const scalar_t* W, const scalar_t* x, const scalar_t* bias, scalar_t* y,
                                    int64_t O, int64_t I) {
  using Vec = Vectorized<scalar_t>;
  constexpr int S = kStreams;
  constexpr int64_t Wd = Vec::size();
  constexpr int64_t kAhead = kStreamAhead / static_cast<int64_t>(sizeof(scalar_t));
  const int64_t Q = O / S, stride = Q * I;
  const int64_t Iv = I / Wd * Wd;
  for (int64_t o = 0; o < Q; ++o) {
    const scalar_t* w0 = W + o * I;
    Vec acc[S];
#pragma GCC unroll 16
    for (int s = 0; s < S; ++s) acc[s] = Vec(0);
    for (int64_t i = 0; i < Iv; i += Wd) {
      const Vec xv = Vec::loadu(x + i);
#pragma GCC unroll 16
      for (int s = 0; s < S; ++s) {
        const scalar_t* p = w0 + s * stride + i;
        __builtin_prefetch(p + kAhead, 0, 3);
        acc[s] = at::vec::fmadd(Vec::loadu(p), xv, acc[s]);
      }
    }
    if (Iv < I) {
      const Vec xv = Vec::loadu(x + Iv, I - Iv);
#pragma GCC unroll 16
      for (int s = 0; s < S; ++s) acc[s] = at::vec::fmadd(Vec::loadu(w0 + s * stride + Iv, I - Iv), xv, acc[s]);
    }
#pragma GCC unroll 16
    for (int s = 0; s < S; ++s) {
      const int64_t row = s * Q + o;
      y[row] = hybridssm::hsum(acc[s]) + (bias != nullptr ? bias[row] : scalar_t(0));
    }
  }
  for (int64_t o = S * Q; o < O; ++o) y[o] = dot(W + o * I, x, I) + (bias != nullptr ? bias[o] : scalar_t(0));
}

// gemv_rows for NX input rows at once (x row j at x + j * ldx, y row j at y + j * ldy): each
// weight row is loaded once for the NX rows, so a few rows (a small batch, a short prefill) read the
// weights once instead of NX times. Each output keeps gemv_rows' own accumulation (one vector over
// the input in order, its tail, the horizontal sum, then the bias), so the values are those of NX
// separate gemv_rows calls. KR weight rows per pass keep KR * NX accumulators in registers.
template <typename scalar_t, int NX, int KR>
void gemv_rows_multi(const scalar_t* W, const scalar_t* x, int64_t ldx, const scalar_t* bias, scalar_t* y,
                     int64_t ldy, int64_t O, int64_t I) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t Wd = Vec::size();
  const int64_t row_bytes = I * static_cast<int64_t>(sizeof(scalar_t));
  WeightAhead ahead(W, O * row_bytes);
  auto out = [&](int64_t o, int j, const Vec& acc) {
    y[j * ldy + o] = hybridssm::hsum(acc) + (bias != nullptr ? bias[o] : scalar_t(0));
  };
  int64_t o = 0;
  for (; o + KR <= O; o += KR) {
    ahead.start(W + o * I, KR * row_bytes, I / Wd);
    Vec acc[KR][NX];
    for (int r = 0; r < KR; ++r)
      for (int j = 0; j < NX; ++j) acc[r][j] = Vec(0);
    int64_t i = 0;
    for (; i + Wd <= I; i += Wd) {
      ahead.step();
      Vec xv[NX];
      for (int j = 0; j < NX; ++j) xv[j] = Vec::loadu(x + j * ldx + i);
      for (int r = 0; r < KR; ++r) {
        const Vec w = Vec::loadu(W + (o + r) * I + i);
        for (int j = 0; j < NX; ++j) acc[r][j] = at::vec::fmadd(w, xv[j], acc[r][j]);
      }
    }
    if (i < I) {
      Vec xv[NX];
      for (int j = 0; j < NX; ++j) xv[j] = Vec::loadu(x + j * ldx + i, I - i);
      for (int r = 0; r < KR; ++r) {
        const Vec w = Vec::loadu(W + (o + r) * I + i, I - i);
        for (int j = 0; j < NX; ++j) acc[r][j] = at::vec::fmadd(w, xv[j], acc[r][j]);
      }
    }
    for (int r = 0; r < KR; ++r)
      for (int j = 0; j < NX; ++j) out(o + r, j, acc[r][j]);
  }
  for (; o < O; ++o) {
    for (int j = 0; j < NX; ++j) {
      y[j * ldy + o] = dot(W + o * I, x + j * ldx, I) + (bias != nullptr ? bias[o] : scalar_t(0));
    }
  }
}

// Whether linear_small computes B rows of x [*, I] (dtype dt) @ W^T with gemm_rows.h's kernel, where
// each row accumulates alone: a row's values are the same whatever the number of rows (prefill.h's
// linear_joint relies on it to append rows to a step's product).
inline bool gemm_rows_takes(int64_t B, int64_t I, at::ScalarType dt, const at::Tensor& W, const at::Tensor& bias) {
  return B > 4 && B <= kGemmRowsMaxBatch && I >= kGemmRowsMinInputs && W.is_contiguous() &&
         W.scalar_type() == dt && (!present(bias) || (bias.is_contiguous() && bias.scalar_type() == dt));
}

inline bool gemm_rows_takes(int64_t B, const at::Tensor& x, const at::Tensor& W, const at::Tensor& bias) {
  return gemm_rows_takes(B, x.size(1), x.scalar_type(), W, bias);
}

// y [B, O] (rows O apart) = x [B, I] (rows ldx apart) @ W[O, I]^T (+ bias), written into y: gemv for
// a small batch (B <= 4: the weights read once for all rows), gemm_rows.h's blocked product up to
// kGemmRowsMaxBatch rows, MKL's GEMM beyond. W (and bias) in scalar_t and contiguous (see as_). The
// step kernels write their intermediates into scratch memory (scratch.h) this way: at batch 1 a
// tensor per product cost as much as a small product.
template <typename scalar_t>
void linear_into(const scalar_t* x, int64_t ldx, int64_t B, int64_t I, const at::Tensor& W, const at::Tensor& bias,
                 scalar_t* y) {
  const int64_t O = W.size(0);
  const bool has_bias = present(bias);
  TORCH_CHECK(W.dim() == 2 && W.size(1) == I && (!has_bias || bias.numel() == O),
              "hybridssm step: linear of input [", B, ", ", I, "] with weight ", W.sizes(), " does not fit");
  if (B == 0) return;
  const scalar_t* b = has_bias ? bias.data_ptr<scalar_t>() : nullptr;
  const scalar_t* w = W.data_ptr<scalar_t>();
  if (B > 4) {
    // Many streams: the weight is read where it lies (gemm_rows.h: MKL would first pack the cold
    // weight); MKL's GEMM for longer inputs (a prefill's frames) and thin ones (I < 32).
    if (gemm_rows_takes(B, I, W.scalar_type(), W, bias)) {
      gemm_rows_detail::gemm_nt<scalar_t>(x, ldx, w, b, y, O, B, O, I, kGemmRowsPassBytes);
      return;
    }
    const at::NoGradGuard no_grad;  // the step has no autograd (out= refuses weights that require grad)
    const auto opts = W.options();
    auto yv = at::from_blob(y, {B, O}, opts);
    const auto xv = at::from_blob(const_cast<scalar_t*>(x), {B, I}, {ldx, 1}, opts);
    has_bias ? at::addmm_out(yv, bias, xv, W.t()) : at::mm_out(yv, xv, W.t());
    return;
  }
  if (weights_streamed()) {  // as many streams as the registers hold accumulators for
    switch (B) {
      case 1: return gemv_streams<scalar_t>(w, x, b, y, O, I);
      case 2: return gemv_streams_multi<scalar_t, 2, 4>(w, x, ldx, b, y, O, O, I);
      case 3: return gemv_streams_multi<scalar_t, 3, 3>(w, x, ldx, b, y, O, O, I);
      default: return gemv_streams_multi<scalar_t, 4, 2>(w, x, ldx, b, y, O, O, I);
    }
  }
  switch (B) {
    case 1: return gemv_rows<scalar_t, 8>(w, x, b, y, O, I);
    case 2: return gemv_rows_multi<scalar_t, 2, 4>(w, x, ldx, b, y, O, O, I);
    case 3: return gemv_rows_multi<scalar_t, 3, 3>(w, x, ldx, b, y, O, O, I);
    default: return gemv_rows_multi<scalar_t, 4, 2>(w, x, ldx, b, y, O, O, I);
  }
}

// x [B, I] @ W[O, I]^T (+ bias) -> [B, O], a new tensor (linear_into). W (and bias) in x's dtype and
// contiguous (see as_); x may be a strided row view.
inline at::Tensor linear_small(const at::Tensor& x, const at::Tensor& W, const at::Tensor& bias) {
  const int64_t B = x.size(0), I = x.size(1);
  TORCH_CHECK(W.dim() == 2, "hybridssm step: linear of input ", x.sizes(), " with weight ", W.sizes(),
              " does not fit");
  const auto xc = x.stride(1) == 1 ? x : x.contiguous();
  auto y = at::empty({B, W.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_small", [&] {
    linear_into<scalar_t>(xc.data_ptr<scalar_t>(), xc.stride(0), B, I, W, bias, y.data_ptr<scalar_t>());
  });
  return y;
}

// The formulas of torch's CPU kernels (x / (1 + exp(-x)); softplus threshold 20), vectorised the
// same way, so that a step reproduces the full forward's values. fp32's exp is aten_exp.h's (ATen's
// vectorised exp written out: the same bits without the out-of-line call); silu.h runs K in lockstep.
template <typename scalar_t>
inline Vectorized<scalar_t> silu(const Vectorized<scalar_t>& x) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    Vectorized<float> e[1] = {x.neg()};
    aten_exp_f32_n(e);
    return x / (Vectorized<float>(1) + e[0]);
  } else {
    return x / (Vectorized<scalar_t>(1) + x.neg().exp());
  }
}

template <typename scalar_t>
void silu_inplace(scalar_t* v, int64_t n) {
  using Vec = Vectorized<scalar_t>;
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t cnt = std::min<int64_t>(Vec::size(), n - i);
    const Vec x = hybridssm::load(v + i, cnt);
    hybridssm::store(silu(x), v + i, cnt);
  }
}

template <typename scalar_t>
void softplus_inplace(scalar_t* v, int64_t n) {
  using Vec = Vectorized<scalar_t>;
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t cnt = std::min<int64_t>(Vec::size(), n - i);
    const Vec x = hybridssm::load(v + i, cnt);
    hybridssm::store(Vec::blendv(x.exp().log1p(), x, x > Vec(20)), v + i, cnt);
  }
}

// ---- helpers of the recurrent mixers' steps (gru, rwkv, delta rules, griffin_lru) ------------

// Apply f(i, cnt) over [0, n) in SIMD-wide chunks (cnt < Vec::size() only for the tail).
template <typename scalar_t, typename F>
inline void vec_chunks(int64_t n, const F& f) {
  constexpr int64_t W = Vectorized<scalar_t>::size();
  for (int64_t i = 0; i < n; i += W) f(i, std::min<int64_t>(W, n - i));
}

// torch's CPU sigmoid: 1 / (1 + exp(-x)).
template <typename scalar_t>
inline Vectorized<scalar_t> sigmoid(const Vectorized<scalar_t>& x) {
  using Vec = Vectorized<scalar_t>;
  return (Vec(1) + x.neg().exp()).reciprocal();
}

// y[O] += sum_i x[i] * W[i, :] for a row-major W [I, O] (a vector times a matrix stored input-major,
// as RWKV's LoRA factors and Griffin's block-diagonal gates): kRows rows of W per pass over y, the
// weight read ahead by `ahead` (a cursor over this weight, or over a larger one that holds it). Each
// output adds the products to y in the order of the inputs, one FMA each.
//
// Measured (a C++ harness, 1 thread, load 2.5-4.4; weights cold: a 64 MB pass between rounds): on
// hybrid[rwkv]'s LoRA factors ([256, 160], [32, 256], [256, 64], [64, 256]) this reads at the batch-1
// GEMV's rate (time 0.92-1.25x gemv_rows<4> over the same bytes stored output-major; both 1.1-1.4x a
// plain sum of the bytes), so the factors keep their input-major layout (no transposed copy). 8 rows
// per pass instead of 4: the same within noise (0.83-1.33x the GEMV).
template <typename scalar_t>
void vecmat_pass(const scalar_t* x, const scalar_t* W, scalar_t* y, int64_t I, int64_t O, WeightAhead& ahead) {
  using Vec = Vectorized<scalar_t>;
  constexpr int kRows = 4;
  const int64_t row_bytes = O * static_cast<int64_t>(sizeof(scalar_t));
  int64_t i = 0;
  for (; i + kRows <= I; i += kRows) {
    Vec xr[kRows];
    for (int r = 0; r < kRows; ++r) xr[r] = Vec(x[i + r]);
    const scalar_t* w = W + i * O;
    ahead.start(w, kRows * row_bytes, (O + Vec::size() - 1) / Vec::size());
    vec_chunks<scalar_t>(O, [&](int64_t o, int64_t cnt) {
      ahead.step();
      Vec acc = hybridssm::load(y + o, cnt);
      for (int r = 0; r < kRows; ++r) acc = at::vec::fmadd(xr[r], hybridssm::load(w + r * O + o, cnt), acc);
      hybridssm::store(acc, y + o, cnt);
    });
  }
  for (; i < I; ++i) {
    const Vec xi(x[i]);
    vec_chunks<scalar_t>(O, [&](int64_t o, int64_t cnt) {
      hybridssm::store(at::vec::fmadd(xi, hybridssm::load(W + i * O + o, cnt), hybridssm::load(y + o, cnt)),
                       y + o, cnt);
    });
  }
}

// y[O] += x[I] @ W [I, O] (vecmat_pass over the one weight).
template <typename scalar_t>
void vecmat_add(const scalar_t* x, const scalar_t* W, scalar_t* y, int64_t I, int64_t O) {
  WeightAhead ahead(W, I * O * static_cast<int64_t>(sizeof(scalar_t)));
  vecmat_pass(x, W, y, I, O, ahead);
}

// y_g = bias_g + x_g @ W[g] for G blocks (x_g = x + g I [I], W [G, I, O], bias [G, O] or null: zero,
// y_g = y + g ldy [O]): Griffin's block-diagonal gates (I = O, ldy = O), RWKV's five LoRA mixes
// (mix_up [5, R, D]). The blocks go in address order under one read-ahead cursor, so the weight is
// read as one stream (a cursor per block would start each block's first lines unannounced: RWKV's
// mix_up read per factor took 0.91-1.43x, mostly 1.05-1.18x, the time of one cursor; the harness above).
template <typename scalar_t>
void vecmat_blocks(const scalar_t* x, const scalar_t* W, const scalar_t* bias, scalar_t* y, int64_t ldy, int64_t G,
                   int64_t I, int64_t O) {
  WeightAhead ahead(W, G * I * O * static_cast<int64_t>(sizeof(scalar_t)));
  for (int64_t g = 0; g < G; ++g) {
    scalar_t* yg = y + g * ldy;
    if (bias != nullptr) {
      std::copy(bias + g * O, bias + (g + 1) * O, yg);
    } else {
      std::fill(yg, yg + O, scalar_t(0));
    }
    vecmat_pass(x + g * I, W + g * I * O, yg, I, O, ahead);
  }
}

// x [B, I] @ W [I, O] -> [B, O] (W input-major, contiguous, in x's dtype): vecmat_add per row for a
// small batch, a GEMM otherwise.
inline at::Tensor matmul_small(const at::Tensor& x, const at::Tensor& W) {
  const int64_t B = x.size(0), I = x.size(1);
  TORCH_CHECK(W.dim() == 2 && W.size(0) == I, "hybridssm step: product of input ", x.sizes(),
              " with matrix ", W.sizes(), " does not fit");
  if (B > 4) return at::mm(x, W);
  const auto xc = x.contiguous();
  auto y = at::zeros({B, W.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "matmul_small", [&] {
    for (int64_t r = 0; r < B; ++r) {
      vecmat_add<scalar_t>(xc.data_ptr<scalar_t>() + r * I, W.data_ptr<scalar_t>(),
                           y.data_ptr<scalar_t>() + r * W.size(1), I, W.size(1));
    }
  });
  return y;
}

// One frame of a depthwise causal conv over channels [0, C) of one row:
//   out[c] = bias[c] + sum_{j < K-1} w[c, j] st[c, j] + w[c, K-1] u[c]
// then st[c] drops its oldest input and takes u[c]. st [C, K-1] (the state's row), w [C, K];
// bias may be null. u and out may not overlap st. The window's width is a template argument for the
// usual widths (K <= 5) so that the window lives in registers: a shift loop of unknown length
// compiles to a memmove call per channel, which cost more than the conv itself at many streams.
template <typename scalar_t, int S>
inline void depthwise_conv_fixed(const scalar_t* u, scalar_t* st, const scalar_t* w, const scalar_t* bias,
                                 scalar_t* out, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* wc = w + c * (S + 1);
    scalar_t* sc = st + c * S;
    scalar_t win[S + 1];
    for (int j = 0; j < S; ++j) win[j] = sc[j];
    win[S] = u[c];
    scalar_t acc = bias != nullptr ? bias[c] : scalar_t(0);
    for (int j = 0; j <= S; ++j) acc += wc[j] * win[j];
    for (int j = 0; j < S; ++j) sc[j] = win[j + 1];
    out[c] = acc;
  }
}

template <typename scalar_t>
void depthwise_conv_step(const scalar_t* u, scalar_t* st, const scalar_t* w, const scalar_t* bias,
                         scalar_t* out, int64_t C, int64_t K) {
  switch (K - 1) {
    case 0: return depthwise_conv_fixed<scalar_t, 0>(u, st, w, bias, out, C);
    case 1: return depthwise_conv_fixed<scalar_t, 1>(u, st, w, bias, out, C);
    case 2: return depthwise_conv_fixed<scalar_t, 2>(u, st, w, bias, out, C);
    case 3: return depthwise_conv_fixed<scalar_t, 3>(u, st, w, bias, out, C);
    case 4: return depthwise_conv_fixed<scalar_t, 4>(u, st, w, bias, out, C);
    default: break;
  }
  const int64_t S = K - 1;
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* wc = w + c * K;
    scalar_t* sc = st + c * S;
    scalar_t acc = bias != nullptr ? bias[c] : scalar_t(0);
    for (int64_t j = 0; j < S; ++j) acc += wc[j] * sc[j];
    acc += wc[S] * u[c];
    std::copy(sc + 1, sc + S, sc);
    sc[S - 1] = u[c];
    out[c] = acc;
  }
}

// The horizontal sums of Vec::size() vectors as one vector: lane l holds the sum of acc[l]'s lanes.
// A row-by-row state update (a dot product over the state dim per channel) reduces a SIMD width of
// channels at once this way; with AVX2 floats it is a tree of horizontal adds (9 instructions for 8
// sums, against a store and 7 dependent adds per sum).
template <typename scalar_t>
inline Vectorized<scalar_t> hsum_lanes(const Vectorized<scalar_t>* acc) {
  using Vec = Vectorized<scalar_t>;
  alignas(64) scalar_t out[Vec::size()];
  for (int64_t l = 0; l < Vec::size(); ++l) out[l] = hybridssm::hsum(acc[l]);
  return Vec::loadu(out);
}

#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
template <>
inline Vectorized<float> hsum_lanes<float>(const Vectorized<float>* acc) {
  const __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]), t1 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]), t3 = _mm256_hadd_ps(acc[6], acc[7]);
  // u0 = [a0 a1 a2 a3 (lanes 0-3) | a0 a1 a2 a3 (lanes 4-7)], u1 the same for a4..a7
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

// Checks shared by the step kernels: dtype of the compute (float / double) and of each state, and
// a tensor's exact shape, each failing with the kernel's name and the expected and actual values.
inline void check_compute_dtype(const char* kind, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "hybridssm step (", kind,
              "): input must be float32 or float64, got ", x.scalar_type());
  // the kernels read the input's rows through raw pointers
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "hybridssm step (", kind, "): input must be a contiguous [B, d], got ",
              x.sizes(), " with strides ", x.strides());
}

inline void check_shape(const char* kind, const char* what, const at::Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK(t.defined() && t.sizes() == shape, "hybridssm step (", kind, "): ", what, " must have shape ",
              shape, ", got ", t.defined() ? t.sizes() : at::IntArrayRef{});
}

inline void check_state(const char* kind, const char* what, const at::Tensor& t, at::IntArrayRef shape,
                        at::ScalarType dt) {
  check_shape(kind, what, t, shape);
  TORCH_CHECK(t.scalar_type() == dt && t.is_contiguous(), "hybridssm step (", kind, "): state ", what,
              " must be contiguous ", dt, ", got ", t.scalar_type());
}

// The spec's arity: nw weights, ni integer and nf float options (a spec from another mixer fails here).
inline void check_spec(const char* kind, const MixerSpec& m, size_t nw, size_t ni, size_t nf) {
  TORCH_CHECK(m.w.size() == nw && m.i.size() == ni && m.f.size() == nf, "hybridssm step (", kind,
              "): expected ", nw, " weights, ", ni, " integer and ", nf, " float options, got ", m.w.size(),
              ", ", m.i.size(), " and ", m.f.size());
}

// Weight idx of m, checked against its expected shape, in the compute dtype (see as_).
inline at::Tensor weight(const char* kind, const MixerSpec& m, size_t idx, const char* name,
                         at::IntArrayRef shape, at::ScalarType dt) {
  check_shape(kind, name, m.w[idx], shape);
  return as_(m.w[idx], dt);
}

}  // namespace hybridssm::step
