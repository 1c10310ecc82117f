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
// Norms are LayerNorm (at::layer_norm, the forward's own call), RMSNorm or the identity (a mixer that
// owns its norms). The ATen calls are those of the eager forward, so the values are the forward's.
//
// run may also restart rows of the batch from the state after a few tokens (Hymba's meta tokens at a
// reset), the tokens riding along with the step's rows (prefill.h's restart entries); prefill runs
// tokens through the blocks alone.

#pragma once

#include "common.h"
#include "prefill.h"

#include <string>
#include <vector>

namespace hybridssm::step {

enum NormKind : int64_t { kIdentity = 0, kLayerNorm = 1, kRMSNorm = 2 };
enum FusionKind : int64_t { kNoFusion = 0, kGate = 1, kMean = 2 };
// the FFN's form (layers.FFN): down(gelu(up x)), down(silu(gate x) * up x), down(gelu_tanh(gate x) * up x)
enum FFNKind : int64_t { kGeluFFN = 0, kSwiGLU = 1, kGeGLU = 2 };

struct Norm {
  int64_t kind = kIdentity;
  at::Tensor w, b;
  double eps = 0;

  at::Tensor operator()(const at::Tensor& x) const {
    const auto dt = x.scalar_type();
    if (kind == kLayerNorm) return at::layer_norm(x, {x.size(-1)}, opt(w, dt), opt(b, dt), eps);
    if (kind == kIdentity) return x;
    // RMSNorm: x * rsqrt(mean(x^2) + eps) * w, per row
    const auto xc = x.contiguous();
    const auto wc = as_(w, dt);
    auto out = at::empty_like(xc);
    const int64_t B = xc.size(0), d = xc.size(1);
    TORCH_CHECK(wc.numel() == d, "step plan: RMSNorm weight of ", wc.numel(), " for width ", d);
    AT_DISPATCH_FLOATING_TYPES(dt, "step_rmsnorm", [&] {
      using Vec = Vectorized<scalar_t>;
      for (int64_t r = 0; r < B; ++r) {
        const scalar_t* v = xc.data_ptr<scalar_t>() + r * d;
        scalar_t* o = out.data_ptr<scalar_t>() + r * d;
        Vec sq(0);
        for (int64_t i = 0; i < d; i += Vec::size()) {
          const int64_t cnt = std::min<int64_t>(Vec::size(), d - i);
          const Vec a = hybridssm::load(v + i, cnt);
          sq = at::vec::fmadd(a, a, sq);
        }
        const scalar_t s = scalar_t(1) / std::sqrt(hybridssm::hsum(sq) / scalar_t(d) + static_cast<scalar_t>(eps));
        const scalar_t* wp = wc.data_ptr<scalar_t>();
        for (int64_t i = 0; i < d; ++i) o[i] = v[i] * s * wp[i];
      }
    });
    return out;
  }
};

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
    at::Tensor h = present(in_w_) ? linear_small(x, as_(in_w_, dt), present(in_b_) ? as_(in_b_, dt) : in_b_)
                                  : x.contiguous();
    return final_norm_(tokens ? restarting_blocks(h, states, pos, *tokens, *done) : blocks(h, states, pos));
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
      for (int64_t t = 0; t < T; ++t) ys.push_back(blocks(h.narrow(0, t * B, B).contiguous(), states, pos));
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
      h = block_with(blk, h, st, mixer_frames, lin);
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
      rows = block_with(
          blk, rows, st,
          [&](const Mixer& mx, at::Tensor* s, const at::Tensor& hn) {
            return mx.restart(hn, B, mx.spec, s, flag, pos);
          },
          lin);
      st += blk.n_states;
    }
    pos.add_(1);
    return rows.narrow(0, 0, B);
  }

  // every block on h [B, d] (contiguous); advances pos by one
  at::Tensor blocks(at::Tensor h, std::vector<at::Tensor>& states, at::Tensor& pos) const {
    at::Tensor* st = states.data();
    for (const auto& blk : blocks_) {
      h = block(blk, h, st, pos);
      st += blk.n_states;
    }
    pos.add_(1);
    return h;
  }

  // one block on h [B, d] (contiguous), its states from st on
  static at::Tensor block(const Block& blk, const at::Tensor& h, at::Tensor* st, const at::Tensor& pos) {
    return block_with(blk, h, st, [&](const Mixer& mx, at::Tensor* s, const at::Tensor& hn) {
      return mx.fn(hn, mx.spec, s, pos);
    });
  }

  // one block on the rows h [N, d] (contiguous), its mixers run by mixer(mx, its states, normed rows),
  // its linear layers by lin (a LinearFn, or prefill.h's linear_joint for a restart)
  template <typename MixerCall, typename Lin = LinearFn>
  static at::Tensor block_with(const Block& blk, const at::Tensor& h, at::Tensor* st, const MixerCall& mixer,
                               const Lin& lin = linear_small) {
    const at::Tensor hn = blk.pre_norm ? blk.norm(h).contiguous() : h;
    at::Tensor y;
    if (blk.fusion == kNoFusion) {
      y = mixer(blk.mixers[0], st, hn);
    } else {
      const auto& ms = blk.mixers[0];
      const auto ys = mixer(ms, st, hn);
      const auto ya = mixer(blk.mixers[1], st + ms.n_states, hn);
      y = fuse(blk, hn, ys, ya, lin);
    }
    at::Tensor out = blk.pre_norm ? h + y : blk.norm(h + y);
    if (!blk.has_ffn) return out;
    return blk.pre_norm ? out + ffn(blk, blk.ffn_norm(out), lin) : blk.ffn_norm(out + ffn(blk, out, lin));
  }

  static int64_t bytes_of(const at::Tensor& t) { return present(t) ? static_cast<int64_t>(t.nbytes()) : 0; }

  static Norm make_norm(int64_t kind, const at::Tensor& w, const at::Tensor& b, double eps) {
    TORCH_CHECK(kind == kIdentity || kind == kLayerNorm || kind == kRMSNorm, "step plan: unknown norm kind ", kind);
    TORCH_CHECK(kind != kRMSNorm || present(w), "step plan: an RMSNorm needs its weight");
    return Norm{kind, w, b, eps};
  }

  template <typename Lin>
  static at::Tensor fuse(const Block& blk, const at::Tensor& h, const at::Tensor& ys, const at::Tensor& ya,
                         const Lin& lin) {
    const auto s = blk.ssm_norm(ys), a = blk.attn_norm(ya);
    if (blk.fusion == kMean) return (a + s) * 0.5;
    const auto dt = h.scalar_type();
    const auto g = at::sigmoid(lin(h, as_(blk.gate_w, dt), present(blk.gate_b) ? as_(blk.gate_b, dt) : at::Tensor()));
    return g * s + (1.0 - g) * a;
  }

  template <typename Lin>
  static at::Tensor ffn(const Block& blk, const at::Tensor& x, const Lin& lin) {
    const auto dt = x.scalar_type();
    auto bias = [dt](const at::Tensor& b) { return present(b) ? as_(b, dt) : at::Tensor(); };
    const auto up = lin(x, as_(blk.up_w, dt), bias(blk.up_b));
    at::Tensor h;
    if (blk.ffn_kind == kGeluFFN) {
      h = at::gelu(up);
    } else {  // the same ATen ops, in the same order, as layers.FFN
      const auto gate = lin(x, as_(blk.gate_w_ffn, dt), bias(blk.gate_b_ffn));
      h = (blk.ffn_kind == kSwiGLU ? at::silu(gate) : at::gelu(gate, "tanh")) * up;
    }
    return lin(h, as_(blk.down_w, dt), bias(blk.down_b));
  }

  at::Tensor in_w_, in_b_;
  Norm final_norm_;
  std::vector<Block> blocks_;
  int64_t n_states_ = 0;
  int64_t weight_bytes_ = 0;  // the weights' bytes at build time: beyond what stays in cache, run streams them
};

}  // namespace hybridssm::step
