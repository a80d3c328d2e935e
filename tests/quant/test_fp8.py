"""fp8 primitives: per-channel weight scales and per-row activation quantization, e4m3 rounding."""

from __future__ import annotations

import torch

from lmforge.quant import fp8


def test_weight_scales_are_per_output_channel():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 96, generator=gen) * torch.linspace(0.01, 3, 40)[:, None]
    p = fp8.quantize(w)
    assert p.qdata.dtype == torch.float8_e4m3fn and p.scale.dtype == torch.float32 and p.scale.shape == (40,)
    torch.testing.assert_close(p.scale, w.abs().amax(1) / 448)
    assert torch.equal(p.qdata.float().abs().amax(1), torch.full((40,), 448.0))  # each row's max maps to 448
    assert torch.equal(p.qdata, (w / p.scale[:, None]).to(torch.float8_e4m3fn))  # round to nearest even
    rel = (fp8.dequantize(p) - w).abs() / w.abs().amax(1, keepdim=True)
    assert rel.max() <= 2 ** -4  # e4m3: 3 mantissa bits


def test_activation_rows_quantize_independently():
    x = torch.randn(5, 33, generator=torch.Generator().manual_seed(1))
    x[2] *= 1000
    x[3] = 0  # an all-zero row gets a finite scale and zeros
    xq, s = fp8.quantize_rows(x)
    assert s.shape == (5, 1) and torch.isfinite(s).all()
    assert torch.equal(xq[3].float(), torch.zeros(33))
    back = xq.float() * s
    for row in (0, 1, 2, 4):
        assert (back[row] - x[row]).abs().max() <= 2 ** -4 * x[row].abs().max()
