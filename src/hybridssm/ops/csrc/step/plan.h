// The model-level step in one call: input projection -> blocks -> final norm, one frame.
//
// A Plan is built once from Python (streaming/plan.py) and holds the parameters themselves (each
// at::Tensor shares its Parameter's TensorImpl: writes through .data, copy_, load_state_dict or an
// optimizer are seen by the next run). Per block:
//
//   residual:  h = norm(x) (pre-norm) | x;  y = mixer(h);  x = x + y (pre) | norm(x + y) (post)
//   parallel:  h as above;  y = fuse(h, mixer_0(h), mixer_1(h));  x as above
//   then, with an FFN:  x = x + down(gelu(up(norm_f(x)))) (pre) | norm_f(x + down(gelu(up(x)))) (post)
//
// fuse: gate  g = sigmoid(gate(h)),  g * s + (1 - g) * a      (s, a RMS-normalised first when asked)
//       mean  (a + s) / 2                                      (likewise)
// Norms are LayerNorm, RMSNorm or the identity (a mixer that owns its norms). The work between the
// mixers and the linear layers (norms, residual adds, the fusion, the FFN's activation) is glue.h's
// loops, the arithmetic of the ATen ops of the eager forward (glue.h says where it differs); the
// residual stream [rows, d] is one tensor per run, updated in place by every block.
//
// run may also restart rows of the batch from the state after a few tokens (Hymba's meta tokens at a
// reset), the tokens riding along with the step's rows (prefill.h's restart entries); prefill runs
// tokens through the blocks alone.

#pragma once

#include "common.h"
#include "glue.h"
#include "prefill.h"

#include <cstring>
#include <string>
#include <vector>

namespace hybridssm::step {

enum FusionKind : int64_t { kNoFusion = 0, kGate = 1, kMean = 2 };

// A linear layer x @ W^T (+ b): linear_small in a step; in a prefill of up to 4 rows a frame,
// prefill.h's linear_rows (the same values, each weight read once for every frame).
using LinearFn = at::Tensor (*)(const at::Tensor& x, const at::Tensor& W, const at::Tensor& bias);

struct Mixer {
  std::string kind;
  MixerFn fn = nullptr;
  FramesFn frames = nullptr;  // several frames in one call (prefill.h), or null: frame by frame
  RestartFn restart = nullptr;  // a step whose restarted rows take a prefill's state (prefill.h), or null
  MixerSpec spec;
  int64_t n_states = 0;
};

struct Block {
  bool pre_norm = true;
  Norm norm;
  std::vector<Mixer> mixers;  // one (residual block) or two (parallel block: ssm, attn)
  int64_t n_states = 0;       // the mixers' state tensors, together
  int64_t fusion = kNoFusion;
  at::Tensor gate_w, gate_b;
  Norm ssm_norm, attn_norm;  // identity when the fusion does not normalise
  bool has_ffn = false;
  Norm ffn_norm;
  int64_t ffn_kind = kGeluFFN;
  at::Tensor up_w, up_b, down_w, down_b, gate_w_ffn, gate_b_ffn;
};

class Plan {
 public:
  void set_input(const at::Tensor& w, const at::Tensor& b) {
    in_w_ = w, in_b_ = b;
    weight_bytes_ += bytes_of(w) + bytes_of(b);
  }

  void set_final_norm(int64_t kind, const at::Tensor& w, const at::Tensor& b, double eps) {
    final_norm_ = make_norm(kind, w, b, eps);
  }

  // mixers: (kind, weights, ints, floats, number of state tensors) each; fusion_w: (gate_w, gate_b,
  // ssm_norm_w, attn_norm_w), fusion_eps: (ssm, attn) (ignored where absent); ffn: (norm_w, norm_b,
  // up_w, up_b, down_w, down_b[, gate_w, gate_b]) or empty (no FFN), with ffn_kind (FFNKind: the
  // gated forms take the gate's weights too).
  void add_block(bool pre_norm, int64_t norm_kind, const at::Tensor& norm_w, const at::Tensor& norm_b,
                 double norm_eps, const std::vector<std::string>& kinds,
                 const std::vector<std::vector<at::Tensor>>& weights, const std::vector<std::vector<int64_t>>& ints,
                 const std::vector<std::vector<double>>& floats, const std::vector<int64_t>& n_states,
                 int64_t fusion, const std::vector<at::Tensor>& fusion_w, const std::vector<double>& fusion_eps,
                 int64_t ffn_norm_kind, const std::vector<at::Tensor>& ffn, double ffn_eps,
                 int64_t ffn_kind) {
    const size_t n = kinds.size();
    TORCH_CHECK((n == 1 && fusion == kNoFusion) || (n == 2 && fusion != kNoFusion),
                "step plan: a block has one mixer, or two with a fusion");
    TORCH_CHECK(weights.size() == n && ints.size() == n && floats.size() == n && n_states.size() == n,
                "step plan: one weight list, int list, float list and state count per mixer");
    Block blk;
    blk.pre_norm = pre_norm;
    blk.norm = make_norm(norm_kind, norm_w, norm_b, norm_eps);
    for (const auto& ws : weights)
      for (const auto& t : ws) weight_bytes_ += bytes_of(t);
    for (const auto& t : fusion_w) weight_bytes_ += bytes_of(t);
    for (const auto& t : ffn) weight_bytes_ += bytes_of(t);
    for (size_t j = 0; j < n; ++j) {
      blk.mixers.push_back(Mixer{kinds[j], find_mixer(kinds[j], n_states[j]), find_frames(kinds[j]),
                                 find_restart(kinds[j]), MixerSpec{weights[j], ints[j], floats[j]},
                                 n_states[j]});
      blk.n_states += n_states[j];
      n_states_ += n_states[j];
    }
    blk.fusion = fusion;
    if (fusion != kNoFusion) {
      TORCH_CHECK(fusion_w.size() == 4 && fusion_eps.size() == 2, "step plan: fusion takes 4 weights, 2 eps");
      blk.gate_w = fusion_w[0], blk.gate_b = fusion_w[1];
      TORCH_CHECK(fusion == kMean || present(blk.gate_w), "step plan: a gate fusion needs its gate weight");
      blk.ssm_norm = make_norm(present(fusion_w[2]) ? kRMSNorm : kIdentity, fusion_w[2], {}, fusion_eps[0]);
      blk.attn_norm = make_norm(present(fusion_w[3]) ? kRMSNorm : kIdentity, fusion_w[3], {}, fusion_eps[1]);
    }
    if (!ffn.empty()) {
      TORCH_CHECK(ffn_kind == kGeluFFN || ffn_kind == kSwiGLU || ffn_kind == kGeGLU,
                  "step plan: unknown FFN kind ", ffn_kind);
      const size_t want = ffn_kind == kGeluFFN ? 6 : 8;
      TORCH_CHECK(ffn.size() == want, "step plan: this FFN takes ", want,
                  " tensors (norm_w, norm_b, up_w, up_b, down_w, down_b[, gate_w, gate_b]), got ", ffn.size());
      blk.has_ffn = true;
      blk.ffn_kind = ffn_kind;
      blk.ffn_norm = make_norm(ffn_norm_kind, ffn[0], ffn[1], ffn_eps);
      blk.up_w = ffn[2], blk.up_b = ffn[3], blk.down_w = ffn[4], blk.down_b = ffn[5];
      if (ffn_kind != kGeluFFN) blk.gate_w_ffn = ffn[6], blk.gate_b_ffn = ffn[7];
    }
    blocks_.push_back(std::move(blk));
  }

  int64_t num_states() const { return n_states_; }

  // whether run can restart rows (every mixer has a restart entry, prefill.h)
  bool restarts() const {
    for (const auto& blk : blocks_)
      for (const auto& mx : blk.mixers)
        if (mx.restart == nullptr) return false;
    return !blocks_.empty();
  }

  // x [B, embed_dim] (or [B, 1, embed_dim]); states: every block's state tensors in order, contiguous,
  // updated in place; pos [B] int64, each row's input position, advanced by one here. Returns [B, d].
  //
  // With tokens [T, hidden] (a reset's prefill, such as Hymba's meta tokens: they enter at the first
  // block) and done [B] bool: the rows where done is true restart first, from the state after the
  // tokens (and position 0), in the same call: every block runs its products over the B rows and the
  // T tokens together (each weight read once for both; prefill.h's restart entries), the tokens'
  // recurrences on a fresh state of one row (all zeros at first, as init_state's), which the restarted
  // rows then take, before the B rows'.
  at::Tensor run(const at::Tensor& x_in, std::vector<at::Tensor> states, at::Tensor pos,
                 const std::optional<at::Tensor>& tokens = std::nullopt,
                 const std::optional<at::Tensor>& done = std::nullopt) const {
    TORCH_CHECK(x_in.dim() == 2 || (x_in.dim() == 3 && x_in.size(1) == 1),
                "step plan: x must be [B, embed_dim] or [B, 1, embed_dim], got ", x_in.sizes());
    const at::Tensor x = x_in.dim() == 3 ? x_in.select(1, 0) : x_in;
    check_states(states, pos, x.size(0));
    TORCH_CHECK(tokens.has_value() == done.has_value(), "step plan: a restart takes both tokens and done");
    if (tokens) check_restart(*tokens, *done, x.size(0));
    const StreamedWeights streamed(weight_bytes_ > kStreamedWeightBytes);  // common.h's gemv_rows
    const auto dt = x.scalar_type();
    // the residual stream, which the blocks update in place: never the caller's x
    at::Tensor h = present(in_w_) ? linear_small(x, as_(in_w_, dt), present(in_b_) ? as_(in_b_, dt) : in_b_)
                                  : rows_copy(x);
    h = tokens ? restarting_blocks(h, states, pos, *tokens, *done) : blocks(h, states, pos);
    final_norm_in_place(h);
    return h;
  }

  // Tokens that enter at the blocks (no input projection, no final norm), such as Hymba's meta tokens:
  // h [B, T, d], the first block's inputs; states as in run; pos [B] advances by T. Block by block: a
  // block's frame t needs only its own input at t and its state after t - 1, so each block runs its
  // row-wise parts (norms, fusion, FFN) over all T frames at once, which reads their weights once for
  // the T frames (at up to 4 rows a frame, prefill.h's linear_rows: the values of the step's linear),
  // and its mixers through their several-frames entries (prefill.h: the projections of the T frames
  // together, the recurrence frame by frame; the values of T steps), or frame by frame where a kind has
  // none. With by_frame, T plain steps of the blocks instead (the reference of the tests). Returns the
  // last block's outputs [B, T, d].
  at::Tensor prefill(const at::Tensor& h_seq, std::vector<at::Tensor> states, at::Tensor pos,
                     bool by_frame = false) const {
    TORCH_CHECK(h_seq.dim() == 3 && h_seq.size(1) >= 1, "step plan: h must be [B, T >= 1, hidden], got ",
                h_seq.sizes());
    const int64_t B = h_seq.size(0), T = h_seq.size(1), d = h_seq.size(2);
    check_states(states, pos, B);
    // frame-major rows [T * B, d] (frame t is rows t*B .. t*B + B - 1), a copy: h_seq is not written
    at::Tensor h = h_seq.transpose(0, 1).clone(at::MemoryFormat::Contiguous).view({T * B, d});
    if (by_frame) {
      std::vector<at::Tensor> ys;
      for (int64_t t = 0; t < T; ++t) ys.push_back(blocks(h.narrow(0, t * B, B), states, pos));
      return at::stack(ys, 1);
    }
    const auto pos0 = pos.clone();
    const LinearFn lin = B <= 4 ? linear_rows : linear_small;
    at::Tensor* st = states.data();
    for (const auto& blk : blocks_) {
      auto mixer_frames = [&](const Mixer& mx, at::Tensor* s, const at::Tensor& hn) {
        if (mx.frames != nullptr) return mx.frames(hn, T, mx.spec, s, pos0);
        std::vector<at::Tensor> ys;
        for (int64_t t = 0; t < T; ++t) {
          pos.copy_(pos0 + t);
          ys.push_back(mx.fn(hn.narrow(0, t * B, B), mx.spec, s, pos));
        }
        return at::cat(ys, 0);
      };
      block_with(blk, h, st, mixer_frames, lin);
      st += blk.n_states;
    }
    pos.copy_(pos0 + T);
    return h.reshape({T, B, d}).transpose(0, 1).contiguous();
  }

 private:
  void check_states(const std::vector<at::Tensor>& states, const at::Tensor& pos, int64_t B) const {
    TORCH_CHECK(static_cast<int64_t>(states.size()) == n_states_, "step plan: expected ", n_states_,
                " state tensors, got ", states.size());
    TORCH_CHECK(pos.dim() == 1 && pos.size(0) == B && pos.scalar_type() == at::kLong,
                "step plan: pos must be int64 [", B, "]");
    for (const auto& s : states) {
      TORCH_CHECK(s.is_contiguous() && s.dim() >= 1 && s.size(0) == B,
                  "step plan: states must be contiguous with batch ", B, " first, got ", s.sizes());
    }
  }

  // run's restart arguments fit the plan and the states (checked before anything is written)
  void check_restart(const at::Tensor& tokens, const at::Tensor& done, int64_t B) const {
    TORCH_CHECK(restarts(), "step plan: a mixer of this plan has no restarting step");
    TORCH_CHECK(tokens.dim() == 2 && tokens.size(0) >= 1, "step plan: tokens must be [T >= 1, hidden], got ",
                tokens.sizes());
    TORCH_CHECK(done.dim() == 1 && done.size(0) == B && done.scalar_type() == at::kBool && done.is_contiguous() &&
                    done.is_cpu(),
                "step plan: done must be a contiguous CPU bool tensor [", B, "], got ", done.scalar_type(), " ",
                done.sizes());
  }

  // every block on h [B, d] and the restart's tokens [T, d] (see run); advances pos by one
  at::Tensor restarting_blocks(const at::Tensor& h, std::vector<at::Tensor>& states, at::Tensor& pos,
                               const at::Tensor& tokens, const at::Tensor& done) const {
    const int64_t B = h.size(0);
    TORCH_CHECK(tokens.size(1) == h.size(1) && tokens.scalar_type() == h.scalar_type(), "step plan: tokens ",
                tokens.scalar_type(), " ", tokens.sizes(), " do not fit the blocks' rows ", h.sizes());
    const bool* flag = done.data_ptr<bool>();
    int64_t* p = pos.data_ptr<int64_t>();
    for (int64_t r = 0; r < B; ++r) p[r] = flag[r] ? 0 : p[r];  // a restarted row starts at position 0
    const auto lin = [B](const at::Tensor& x, const at::Tensor& W, const at::Tensor& b) {
      return linear_joint(x, B, W, b);
    };
    at::Tensor rows = at::cat({h, tokens}, 0);  // [B + T, d]: the step's rows, then the tokens
    at::Tensor* st = states.data();
    for (const auto& blk : blocks_) {
      block_with(
          blk, rows, st,
          [&](const Mixer& mx, at::Tensor* s, const at::Tensor& hn) {
            return mx.restart(hn, B, mx.spec, s, flag, pos);
          },
          lin);
      st += blk.n_states;
    }
    advance(pos);
    return rows.narrow(0, 0, B);
  }

  // every block on h [B, d] (contiguous, the residual stream: updated in place and returned);
  // advances pos by one
  at::Tensor blocks(at::Tensor h, std::vector<at::Tensor>& states, at::Tensor& pos) const {
    at::Tensor* st = states.data();
    for (const auto& blk : blocks_) {
      block_with(blk, h, st, [&](const Mixer& mx, at::Tensor* s, const at::Tensor& hn) {
        return mx.fn(hn, mx.spec, s, pos);
      });
      st += blk.n_states;
    }
    advance(pos);
    return h;
  }

  // x [B, d] copied into a new contiguous tensor: one allocation and a memcpy per row where x's rows
  // are contiguous (a clone is three ATen ops)
  static at::Tensor rows_copy(const at::Tensor& x) {
    if (x.stride(1) != 1) return x.clone(at::MemoryFormat::Contiguous);
    auto h = at::empty({x.size(0), x.size(1)}, x.options());
    const int64_t row = x.size(1) * static_cast<int64_t>(x.element_size());
    const auto* in = static_cast<const char*>(x.data_ptr());
    auto* out = static_cast<char*>(h.data_ptr());
    for (int64_t r = 0; r < x.size(0); ++r) std::memcpy(out + r * row, in + r * x.stride(0) * x.element_size(), row);
    return h;
  }

  // pos += 1 (a loop: an ATen add_ costs more than the B values)
  static void advance(at::Tensor& pos) {
    int64_t* p = pos.data_ptr<int64_t>();
    const int64_t stride = pos.stride(0);
    for (int64_t r = 0; r < pos.size(0); ++r) p[r * stride] += 1;
  }

  // the final norm of the run's output h [B, d] (contiguous rows), in place
  void final_norm_in_place(at::Tensor& h) const {
    if (final_norm_.identity()) return;
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "step_final_norm", [&] {
      final_norm_.rows(h.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), h.size(0), h.size(1));
    });
  }

  // One block on the rows h [N, d] (contiguous): h is the residual stream, updated in place to the
  // block's output. Its mixers run by mixer(mx, its states, normed rows), its linear layers by lin (a
  // LinearFn, or prefill.h's linear_joint for a restart). The pre-norm's output goes to this thread's
  // scratch (glue.h), dead once the mixers and the gate have read it; each residual add runs with
  // the norm that reads its sum (glue.h's add_norm_rows).
  template <typename MixerCall, typename Lin = LinearFn>
  static void block_with(const Block& blk, at::Tensor& h, at::Tensor* st, const MixerCall& mixer,
                         const Lin& lin = linear_small) {
    const int64_t N = h.size(0), d = h.size(1);
    const auto dt = h.scalar_type();
    TORCH_CHECK(h.is_contiguous(), "step plan: the blocks' rows must be contiguous, got strides ", h.strides());
    const bool pre = blk.pre_norm;
    at::Tensor hn = h;
    if (pre && !blk.norm.identity()) {
      hn = scratch_rows(N, d, dt);
      AT_DISPATCH_FLOATING_TYPES(dt, "step_norm", [&] {
        blk.norm.rows(h.data_ptr<scalar_t>(), hn.data_ptr<scalar_t>(), N, d);
      });
    }
    at::Tensor y;
    if (blk.fusion == kNoFusion) {
      y = mixer(blk.mixers[0], st, hn).contiguous();
    } else {
      const auto& ms = blk.mixers[0];
      auto ys = mixer(ms, st, hn);
      auto ya = mixer(blk.mixers[1], st + ms.n_states, hn);
      y = fuse(blk, hn, ys, ya, lin);
    }
    check_rows("mixer output", y, N, d);
    // pre-norm: h += y, and the FFN's norm of it into the scratch; post-norm: h = norm(h + y)
    const bool ffn_normed = blk.has_ffn && pre && !blk.ffn_norm.identity();
    at::Tensor xf = ffn_normed ? scratch_rows(N, d, dt) : h;
    const Norm* after = pre ? (ffn_normed ? &blk.ffn_norm : nullptr) : (blk.norm.identity() ? nullptr : &blk.norm);
    AT_DISPATCH_FLOATING_TYPES(dt, "step_residual", [&] {
      add_norm_rows(h.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), after,
                    pre ? xf.data_ptr<scalar_t>() : h.data_ptr<scalar_t>(), N, d);
    });
    if (!blk.has_ffn) return;
    // pre-norm: h += ffn(norm_f(h)); post-norm: h = norm_f(h + ffn(h))
    const at::Tensor f = ffn(blk, xf, lin);
    check_rows("FFN output", f, N, d);
    const Norm* last = pre || blk.ffn_norm.identity() ? nullptr : &blk.ffn_norm;
    AT_DISPATCH_FLOATING_TYPES(dt, "step_residual", [&] {
      add_norm_rows(h.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), last, h.data_ptr<scalar_t>(), N, d);
    });
  }

  static void check_rows(const char* what, const at::Tensor& t, int64_t N, int64_t d) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == d && t.is_contiguous(), "step plan: ", what,
                " must be contiguous [", N, ", ", d, "], got ", t.sizes());
  }

  static int64_t bytes_of(const at::Tensor& t) { return present(t) ? static_cast<int64_t>(t.nbytes()) : 0; }

  static Norm make_norm(int64_t kind, const at::Tensor& w, const at::Tensor& b, double eps) {
    TORCH_CHECK(kind == kIdentity || kind == kLayerNorm || kind == kRMSNorm, "step plan: unknown norm kind ", kind);
    TORCH_CHECK(kind != kRMSNorm || present(w), "step plan: an RMSNorm needs its weight");
    return Norm{kind, w, b, eps};
  }

  // The parallel block's fusion of the mixers' outputs ys and ya (fresh tensors, [N, d]), written
  // into ys: gate  sigmoid(gate(hn)) * s + (1 - sigmoid(gate(hn))) * a,  mean  (a + s) * 0.5, with s
  // and a RMS-normalised first (in place) where the block asks.
  template <typename Lin>
  static at::Tensor fuse(const Block& blk, const at::Tensor& hn, at::Tensor ys, at::Tensor ya, const Lin& lin) {
    const int64_t N = hn.size(0);
    ys = ys.contiguous(), ya = ya.contiguous();
    TORCH_CHECK(ys.sizes() == ya.sizes() && ys.dim() == 2 && ys.size(0) == N, "step plan: the fused mixers' outputs ",
                ys.sizes(), " and ", ya.sizes(), " differ");
    const auto dt = hn.scalar_type();
    at::Tensor g;
    if (blk.fusion == kGate) {
      g = lin(hn, as_(blk.gate_w, dt), present(blk.gate_b) ? as_(blk.gate_b, dt) : at::Tensor()).contiguous();
      check_rows("fusion gate", g, N, ys.size(1));
    }
    AT_DISPATCH_FLOATING_TYPES(dt, "step_fuse", [&] {
      scalar_t *s = ys.data_ptr<scalar_t>(), *a = ya.data_ptr<scalar_t>();
      blk.ssm_norm.rows(s, s, N, ys.size(1));
      blk.attn_norm.rows(a, a, N, ys.size(1));
      fuse_into(s, a, g.defined() ? g.data_ptr<scalar_t>() : nullptr, ys.numel());
    });
    return ys;
  }

  // down(act(up x)) with the activation in place in up's output (glue.h's ffn_activation)
  template <typename Lin>
  static at::Tensor ffn(const Block& blk, const at::Tensor& x, const Lin& lin) {
    const auto dt = x.scalar_type();
    auto bias = [dt](const at::Tensor& b) { return present(b) ? as_(b, dt) : at::Tensor(); };
    at::Tensor up = lin(x, as_(blk.up_w, dt), bias(blk.up_b)).contiguous();
    at::Tensor gate;
    if (blk.ffn_kind != kGeluFFN) {
      gate = lin(x, as_(blk.gate_w_ffn, dt), bias(blk.gate_b_ffn)).contiguous();
      TORCH_CHECK(gate.sizes() == up.sizes(), "step plan: FFN gate ", gate.sizes(), " and up ", up.sizes(), " differ");
    }
    AT_DISPATCH_FLOATING_TYPES(dt, "step_ffn_activation", [&] {
      ffn_activation(blk.ffn_kind, up.data_ptr<scalar_t>(), gate.defined() ? gate.data_ptr<scalar_t>() : nullptr,
                     up.numel());
    });
    return lin(up, as_(blk.down_w, dt), bias(blk.down_b));
  }

  at::Tensor in_w_, in_b_;
  Norm final_norm_;
  std::vector<Block> blocks_;
  int64_t n_states_ = 0;
  int64_t weight_bytes_ = 0;  // the weights' bytes at build time: beyond what stays in cache, run streams them
};

}  // namespace hybridssm::step
