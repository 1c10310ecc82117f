"""The step plan's glue (ops/csrc/step/glue.h: norms, residual adds, the parallel blocks' fusion, the
FFN's activation) against the ATen ops it replaces: bit for bit where it runs ATen's arithmetic
(LayerNorm in fp32 with its weight, GELU erf and tanh, SiLU, the gate and mean fusions, the adds),
within stated bounds elsewhere (RMSNorm against the forward's rsqrt form; GELU against oneDNN's,
which at::gelu takes by default), over wide ranges with +-0, +-inf and NaN; each value depends on
its input alone (not on its place or the number of rows). Then the plan around it: the caller's
input is never written, and two threads stepping one model get the values of one thread."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.nn.functional as F

import hybridssm as hs
from hybridssm.ops.step import fused_step_available, step_extension

pytestmark = pytest.mark.skipif(not fused_step_available(),
                                reason="the fused step kernels are not built here")

_E = torch.empty(0)
_IDENTITY, _LAYER, _RMS = 0, 1, 2
_GELU, _SWIGLU, _GEGLU = 0, 1, 2


def _ext():
    return step_extension()


def _same_bits(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    same = (ours == ref) & (torch.signbit(ours) == torch.signbit(ref)) | (ours.isnan() & ref.isnan())
    if not same.all():
        bad = (~same).nonzero()[0].tolist()
        raise AssertionError(f"{what} at {bad}: {ours[tuple(bad)].item()!r} against ATen's "
                             f"{ref[tuple(bad)].item()!r} ({(~same).sum().item()} values differ)")


def _every_exponent(n_per: int = 64, seed: int = 0) -> torch.Tensor:
    """fp32 values with random mantissas at every exponent (denormals included), both signs, then
    +-0, +-inf and NaN; a multiple of 16 values."""
    gen = torch.Generator().manual_seed(seed)
    exponent = torch.arange(0, 255, dtype=torch.int32).repeat_interleave(n_per)
    mantissa = torch.randint(0, 1 << 23, exponent.shape, dtype=torch.int32, generator=gen)
    pos = ((exponent << 23) | mantissa).view(torch.float32)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")] + [1.0] * 11)
    x = torch.cat([pos, -pos, special])
    return x[torch.randperm(x.numel(), generator=gen)]


def _moderate(n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Values a step meets: normal around 0 with scales from 1e-3 to 1e3, and a few zeros."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=dtype) * 10 ** torch.randint(-3, 4, (n,), generator=gen).to(dtype)
    x[::97] = 0.0
    return x


# ---- norms ------------------------------------------------------------------------------------
WIDTHS = [1, 5, 8, 16, 100, 256, 1000]


def _rows(d: int, dtype, seed: int = 0) -> torch.Tensor:
    """Rows of width d at scales 1e-20 .. 1e15 and offsets (a mean far from 0), one with +-0 only."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([1e-20, 1e-3, 1.0, 1.0, 1e3, 1e15], dtype=dtype)
    x = torch.randn(len(scales), d, generator=gen, dtype=dtype) * scales[:, None]
    x[3] += 1e4
    zero = torch.zeros(1, d, dtype=dtype)
    zero[0, ::2] = -0.0
    return torch.cat([x, zero])


@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("affine", ["weight_bias", "weight", "none"])
def test_layer_norm_fp32_bit_for_bit(d, affine):
    x = _rows(d, torch.float32, seed=d)
    w = torch.randn(d) if affine != "none" else None
    b = torch.randn(d) if affine == "weight_bias" else None
    for eps in (1e-5, 1e-6):
        ours = _ext().glue_norm(x, _LAYER, w if w is not None else _E, b if b is not None else _E, eps)
        _same_bits(ours, F.layer_norm(x, (d,), w, b, eps), f"LayerNorm d={d} {affine} eps={eps}")


@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("dtype, affine", [(torch.float32, "bias"), (torch.float64, "weight_bias"),
                                           (torch.float64, "bias"), (torch.float64, "none")])
def test_layer_norm_elsewhere_within_two_ulp(d, dtype, affine):
    """fp64, and fp32 with a bias but no weight (no layer of the package builds it): ATen's kernel
    takes other paths there; within 2 ULP of the row's largest output."""
    x = _rows(d, dtype, seed=d)
    w = torch.randn(d, dtype=dtype) if affine == "weight_bias" else None
    b = torch.randn(d, dtype=dtype) if affine != "none" else None
    ours = _ext().glue_norm(x, _LAYER, w if w is not None else _E, b if b is not None else _E, 1e-5)
    ref = F.layer_norm(x, (d,), w, b, 1e-5)
    tol = 2 * torch.finfo(dtype).eps * ref.abs().amax(-1, keepdim=True)
    assert ((ours - ref).abs() <= tol).all(), (ours - ref).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", WIDTHS)
def test_rms_norm_within_four_ulp_of_the_forward(d, dtype):
    """The step's RMSNorm, x * (1 / sqrt(mean(x^2) + eps)) * w, against layers.RMSNorm's rsqrt form:
    within 4 ULP of each output (both round the mean and the scale a little differently)."""
    x = _rows(d, dtype, seed=d)[1:6]  # 1e-20 would fall under eps: both give ~0 there
    w = torch.randn(d, dtype=dtype)
    ours = _ext().glue_norm(x, _RMS, w, _E, 1e-6)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    assert ((ours - ref).abs() <= 4 * torch.finfo(dtype).eps * ref.abs()).all(), (ours - ref).abs().max()


def test_identity_norm_copies():
    x = torch.randn(3, 10)
    ours = _ext().glue_norm(x, _IDENTITY, _E, _E, 0.0)
    assert torch.equal(ours, x) and ours.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("kind", [_IDENTITY, _LAYER, _RMS])
def test_residual_add_then_norm_of_the_sum(kind):
    """add_norm_rows: h + y bit for bit (every fp32 exponent, +-0, inf, NaN), and the norm of that sum
    bit for bit the norm alone (rows of 100 values: a partial vector at each row's end)."""
    v = _every_exponent(seed=1)
    h = v[: v.numel() // 100 * 100].view(-1, 100)
    y = _every_exponent(seed=2)[: h.numel()].view_as(h)
    w, b = torch.randn(100), torch.randn(100)
    if kind == _RMS:
        b = _E
    total, normed = _ext().glue_add_norm(h, y, kind, w, b, 1e-5)
    _same_bits(total, h + y, "h + y")
    if kind == _IDENTITY:
        assert torch.equal(normed, torch.zeros_like(h)), "no norm: the output is not written"
    else:
        _same_bits(normed, _ext().glue_norm(total, kind, w, b, 1e-5), "norm of the sum")


# ---- the parallel blocks' fusion ----------------------------------------------------------------
def test_gate_fusion_bit_for_bit():
    """sigmoid(g) * s + (1 - sigmoid(g)) * a: the ATen ops of the forward, one rounding each."""
    g, s, a = _every_exponent(seed=3), _every_exponent(seed=4), _every_exponent(seed=5)
    sg = torch.sigmoid(g)
    _same_bits(_ext().glue_fuse(s, a, g), sg * s + (1 - sg) * a, "gate fusion")
    g, s, a = (_moderate(4096, seed) for seed in (6, 7, 8))
    sg = torch.sigmoid(g)
    _same_bits(_ext().glue_fuse(s, a, g), sg * s + (1 - sg) * a, "gate fusion (moderate)")


def test_mean_fusion_bit_for_bit():
    s, a = _every_exponent(seed=9), _every_exponent(seed=10)
    _same_bits(_ext().glue_fuse(s, a, _E), (a + s) * 0.5, "mean fusion")


# ---- the FFN's activation ---------------------------------------------------------------------
def _aten_gelu(x: torch.Tensor, **kw) -> torch.Tensor:
    """ATen's own GELU kernel (oneDNN off: at::gelu of float otherwise takes oneDNN's). Switching
    oneDNN off makes torch warn that TF32 on oneDNN needs an Intel GPU: not this test's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        with torch.backends.mkldnn.flags(enabled=False):
            return F.gelu(x, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gelu_bit_for_bit_atens_kernel(dtype):
    x = _every_exponent(seed=11).to(dtype)
    _same_bits(_ext().glue_ffn_activation(_GELU, x, _E), _aten_gelu(x), "gelu")


def test_gelu_near_onednns():
    """Against at::gelu's default (oneDNN's erf GELU): |ours - oneDNN's| <= 2 eps max(|x|, 1) (measured:
    1.0; both within 1.5 of float64's GELU in that measure). Relative to the value the two part by up to
    ~900 ULP where 1 + erf(x / sqrt(2)) cancels (x in [-10, -1], |GELU| < 2e-3): ATen's own formula."""
    x = torch.cat([torch.linspace(-100, 100, 200_001), _moderate(100_000, seed=12)])
    ours, ref = _ext().glue_ffn_activation(_GELU, x, _E), F.gelu(x)
    tol = 2 * torch.finfo(torch.float32).eps * x.abs().clamp_min(1)
    assert ((ours - ref).abs() <= tol).all(), ((ours - ref).abs() / tol).max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", [_SWIGLU, _GEGLU])
def test_gated_activations_bit_for_bit(kind, dtype):
    """layers.FFN's silu(gate) * up and gelu_tanh(gate) * up."""
    gate, up = _every_exponent(seed=13).to(dtype), _every_exponent(seed=14).to(dtype)
    act = F.silu(gate) if kind == _SWIGLU else _aten_gelu(gate, approximate="tanh")
    _same_bits(_ext().glue_ffn_activation(kind, up, gate), act * up, f"gated activation {kind}")


@pytest.mark.parametrize("kind", [_GELU, _SWIGLU, _GEGLU])
def test_values_do_not_depend_on_their_place(kind):
    """Every element goes through the vector forms, a row's last partial vector too: the same input
    gives the same bits at any offset and in any number of rows (the restart and prefill rely on it)."""
    gate, up = _moderate(1000, seed=15), _moderate(1000, seed=16)
    whole = _ext().glue_ffn_activation(kind, up, gate)
    for start in (1, 3, 7, 13):
        part = _ext().glue_ffn_activation(kind, up[start:], gate[start:])
        assert torch.equal(part, whole[start:]), f"offset {start}"
    s, a, g = _moderate(1000, seed=17), _moderate(1000, seed=18), _moderate(1000, seed=19)
    assert torch.equal(_ext().glue_fuse(s[5:], a[5:], g[5:]), _ext().glue_fuse(s, a, g)[5:])


def test_gated_kind_without_a_gate_is_refused():
    with pytest.raises(RuntimeError, match="gate must have up's shape"):
        _ext().glue_ffn_activation(_SWIGLU, torch.randn(8), _E)
    with pytest.raises(RuntimeError, match="kind must be 0"):
        _ext().glue_ffn_activation(3, torch.randn(8), _E)


# ---- the plan around it -----------------------------------------------------------------------
def _hybrid(**kw):
    """A hybrid of pre-norm blocks with FFNs and the gate fusion (hymba: parallel SSM + attention)."""
    torch.manual_seed(0)
    model = hs.build("hymba", embed_dim=16, hidden_size=16, num_layers=2, **kw).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("layout", ["rows", "frame", "strided"])
def test_step_never_writes_the_callers_input(layout):
    """Without an input projection the blocks' residual stream starts from a copy of x ([B, E],
    [B, 1, E], or rows with a stride)."""
    model = _hybrid()
    assert isinstance(model.input_proj, torch.nn.Identity)
    base = torch.randn(2, 32)
    x = {"rows": base[:, :16], "frame": base[:, None, :16], "strided": base[:, ::2]}[layout]
    before = base.clone()
    state, ref_state = model.init_state(2), model.init_state(2)
    with torch.inference_mode():
        y1, state = model.step(x, state, inplace=True)
        y1_copy = y1.clone()
        y2, state = model.step(x, state, inplace=True)
        ref, ref_state = model.step(x.reshape(2, 16).clone(), ref_state, inplace=True)
    assert torch.equal(base, before), "the step wrote into its input"
    assert torch.equal(y1, y1_copy), "the next step wrote into the previous step's output"
    assert torch.equal(y1.reshape(ref.shape), ref), "the layout of x changed the values"
    assert not torch.equal(y1, y2)


def test_two_threads_stepping_one_model_match_one_thread():
    """The glue's scratch is per thread: two threads stepping one model at once (the run releases
    the GIL) give the values of the same steps run one after the other."""
    model = _hybrid()
    xs = torch.randn(2, 40, 2, 16)

    def run(k, out):
        with torch.inference_mode():
            state = model.init_state(2)
            ys = []
            for t in range(xs.shape[1]):
                y, state = model.step(xs[k, t], state, inplace=True)
                ys.append(y.clone())
        out[k] = torch.stack(ys)

    alone = {}
    for k in range(2):
        run(k, alone)
    together = {}
    threads = [threading.Thread(target=run, args=(k, together)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(2):
        assert torch.equal(together[k], alone[k]), f"stream {k}"
