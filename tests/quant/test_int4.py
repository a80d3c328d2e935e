"""int4 primitives: the packed layout, the three ways of choosing parameters, and their errors."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.quant import int4


def _weight(n=24, k=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen) * 0.05 + 0.01 * torch.randn(n, 1, generator=gen)


def test_pack_layout_is_low_nibble_first():
    q = torch.tensor([[1, 2, 15, 0, 7, 9]])
    packed = int4.pack(q)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0x21, 0x0F, 0x97]]
    assert torch.equal(int4.unpack(packed), q.to(torch.uint8))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_asymmetric_rtn_is_min_max_with_fractional_zero(group):
    w = _weight()
    p = int4.quantize(w, int4.Int4Config(group_size=group), torch.float32)
    N, K = w.shape
    assert p.qdata.shape == (N, K // 2) and p.scales.shape == p.zeros.shape == (N, K // group)
    groups = w.reshape(N, K // group, group)
    lo, hi = groups.amin(-1), groups.amax(-1)
    torch.testing.assert_close(p.scales, (hi - lo) / 15, rtol=1e-6, atol=0)
    torch.testing.assert_close(p.zeros, -lo / p.scales, rtol=1e-5, atol=1e-5)
    assert (p.zeros != p.zeros.round()).any()  # fractional zero points, not rounded to integers
    # every value within half a step of its reconstruction (min and max land on the grid's ends)
    step = p.scales.repeat_interleave(group, 1)
    assert ((int4.dequantize(p) - w).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_integer_zero_points_are_rounded_min_max(dtype):
    w = _weight(seed=3)
    p = int4.quantize(w, int4.Int4Config(group_size=32, zero_points="int"), dtype)
    N, K = w.shape
    groups = w.reshape(N, K // 32, 32)
    lo, hi = groups.amin(-1), groups.amax(-1)
    torch.testing.assert_close(p.scales.float(), ((hi - lo) / 15).to(dtype).float(), rtol=0, atol=0)
    z = p.zeros.float()
    assert p.zeros.dtype == dtype and torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= 15
    assert ((z - (-lo / ((hi - lo) / 15))).abs() <= 0.5 + 1e-4).all()  # the fractional one, rounded
    s, zz = (t.float().repeat_interleave(32, 1) for t in (p.scales, p.zeros))
    assert torch.equal(int4.unpack(p.qdata).float(), torch.clamp(torch.round(w / s) + zz, 0, 15))
    exact = int4.quantize(w, int4.Int4Config(group_size=32), torch.float32)
    err_int, err_float = ((int4.dequantize(q) - w).norm() for q in (p, exact))
    assert err_float < err_int < 1.2 * err_float  # a little worse than fractional ones, not much


def test_integer_zero_points_need_rtn():
    with pytest.raises(LmforgeError, match="integer zero points need 'rtn'"):
        int4.Int4Config(method="hqq", zero_points="int")
    with pytest.raises(LmforgeError, match="zero points must be one of float, int"):
        int4.Int4Config(zero_points="half")


def test_symmetric_has_no_zeros_and_centres_on_eight():
    w = _weight(seed=1)
    p = int4.quantize(w, int4.Int4Config(group_size=64, symmetric=True), torch.float32)
    assert p.zeros is None
    amax = w.reshape(24, 4, 64).abs().amax(-1)
    torch.testing.assert_close(p.scales, amax / 7.5, rtol=1e-6, atol=0)
    q = int4.unpack(p.qdata).float()
    ratio = w / p.scales.repeat_interleave(64, 1)
    want = torch.clamp(torch.round(ratio) + 8, 0, 15)
    off = q != want  # only where w / scale sits on a rounding tie (torchao multiplies by 1 / scale)
    assert ((ratio[off] - ratio[off].floor() - 0.5).abs() < 1e-4).all()  # +-7.5 at each group's max |w|


def test_stored_dtype_and_codes_agree_with_rounded_parameters():
    """q is computed against the bfloat16 scales and zero points the artifact stores, so a consumer that
    rounds w / scale + zero from those gets the same codes."""
    w = _weight(seed=2)
    p = int4.quantize(w, int4.Int4Config(), torch.bfloat16)
    assert p.scales.dtype == p.zeros.dtype == torch.bfloat16
    s, z = (t.float().repeat_interleave(128, 1) for t in (p.scales, p.zeros))
    assert torch.equal(int4.unpack(p.qdata).float(), torch.clamp(torch.round(w / s + z), 0, 15))


def test_hqq_optimises_zero_points():
    w = _weight(seed=3)
    rtn = int4.quantize(w, int4.Int4Config(), torch.float32)
    hqq = int4.quantize(w, int4.Int4Config(method="hqq"), torch.float32)
    assert not torch.equal(hqq.zeros, rtn.zeros)
    err = {name: (int4.dequantize(p) - w).abs().mean().item() for name, p in (("rtn", rtn), ("hqq", hqq))}
    assert err["hqq"] < 1.2 * err["rtn"], err  # HQQ minimises an l_p (p < 1) error, close to RTN's in l_1


def test_dequantize_formula():
    q = torch.randint(0, 16, (3, 64), generator=torch.Generator().manual_seed(4))
    scales, zeros = torch.rand(3, 2) + 0.1, torch.rand(3, 2) * 15
    p = int4.Int4Weight(int4.pack(q), scales, zeros, 32)
    want = (q.double() - zeros.double().repeat_interleave(32, 1)) * scales.double().repeat_interleave(32, 1)
    torch.testing.assert_close(int4.dequantize(p).double(), want, rtol=1e-6, atol=1e-7)
    p_sym = int4.Int4Weight(int4.pack(q), scales, None, 32)
    torch.testing.assert_close(int4.dequantize(p_sym).double(),
                               (q.double() - 8) * scales.double().repeat_interleave(32, 1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs, message", [
    ({"group_size": 48}, "group size must be one of 32, 64, 128, 256, got 48"),
    ({"method": "gptq"}, "method must be one of rtn, hqq, got 'gptq'"),
    ({"method": "hqq", "symmetric": True}, "asymmetric only"),
])
def test_bad_configs(kwargs, message):
    with pytest.raises(LmforgeError, match=message):
        int4.Int4Config(**kwargs)


def test_unsuitable_shapes_are_named():
    cfg = int4.Int4Config(group_size=64)
    assert cfg.unsuitable((8, 112)) == "in_features 112 is not a multiple of the group size 64"
    assert cfg.unsuitable((8,)) == "a 1-D weight"
    with pytest.raises(LmforgeError, match="in_features 112 is not a multiple"):
        int4.quantize(torch.randn(8, 112), cfg)
