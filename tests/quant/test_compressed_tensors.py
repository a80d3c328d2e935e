"""Reading compressed-tensors checkpoints (`lmforge optimize` on one keeps its quantized weights exactly), and
the packing both ways. Checkpoints are written by compressed-tensors' own compressor from a tiny Llama, and
the artifact is checked against transformers loading the same checkpoint, not against lmforge's export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.errors import LmforgeError
from lmforge.quant import handler
from lmforge.quant.compressed_tensors import pack_int32, unpack_int32
from tests.conftest import random_ids, sharpened

ct = pytest.importorskip("compressed_tensors")

FP32_ATOL = 1e-4  # the same dequantized weights in float32: summation order only


def test_pack_layout_is_low_bits_first_and_inverts():
    v = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15, 9]])
    words = pack_int32(v, 4)
    assert words.dtype == torch.int32 and words.shape == (1, 2)
    assert words[0, 0].item() == 0xF7654321 - (1 << 32) and words[0, 1].item() == 9
    assert torch.equal(unpack_int32(words, 4, 9), v)
    gen = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        x = torch.randint(0, 1 << bits, (13, 21), generator=gen)
        for dim in (0, 1):
            length = x.shape[dim]
            assert torch.equal(unpack_int32(pack_int32(x, bits, dim), bits, length, dim), x)
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        signed = x - (1 << (bits - 1))  # compressed-tensors packs signed values, offset by half the range
        assert torch.equal(pack_int32(x, bits, 1), pack_to_int32(signed.to(torch.int8), bits, packed_dim=1))
        assert torch.equal(pack_int32(x, bits, 0), pack_to_int32(signed.to(torch.int8), bits, packed_dim=0))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=131, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    return sharpened(model.eval())


def _ct_checkpoint(model, preset: str, out: Path, dtype=torch.float32, group_size: int | None = None,
                   **weights) -> Path:
    """A checkpoint written by compressed-tensors itself: its preset scheme, its min/max parameters, its compressor."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import save_file

    scheme = preset_name_to_scheme(preset, ["Linear"])
    if group_size:
        scheme.weights.group_size = group_size
    for key, value in weights.items():  # e.g. strategy="channel" (no group size then)
        setattr(scheme.weights, key, value)
    if scheme.weights.strategy == "channel":
        scheme.weights.group_size = None
    args = scheme.weights
    fmt = "float-quantized" if args.type == "float" else "pack-quantized"
    compressor = BaseCompressor.load_from_registry(fmt)
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        w = state.pop(f"{name}.weight")
        rows = w.float().reshape(w.shape[0], -1, args.group_size) if args.group_size else w.float()[:, None, :]
        scale, zp = calculate_qparams(rows.amin(-1), rows.amax(-1), args)
        scale = scale.to(dtype)
        part = {"weight": w, "weight_scale": scale, "weight_zero_point": zp}
        for key, value in compressor.compress(part, scheme).items():
            if value is not None:
                state[f"{name}.{key}"] = value.contiguous()
    out.mkdir()
    save_file(state, str(out / "model.safetensors"))
    config = model.config.to_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = QuantizationConfig(
        config_groups={"group_0": scheme}, format=fmt, quantization_status="compressed", ignore=["lm_head"],
    ).model_dump(mode="json")
    (out / "config.json").write_text(json.dumps(config))
    return out


def _hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


@pytest.mark.parametrize("preset,group", [("W4A16", 32), ("W4A16_ASYM", 64), ("W4A16", 128), ("W8A16", None),
                                          ("FP8_DYNAMIC", None)])
def test_optimize_keeps_a_compressed_checkpoints_weights(tmp_path, preset, group):
    model = _tiny_llama()
    channel = dict(strategy="channel") if preset == "W8A16" else {}  # lmforge's int8: per channel
    ckpt = _ct_checkpoint(model, preset, tmp_path / "ckpt", group_size=group, **channel)
    art = lmforge.optimize(ckpt, tmp_path / "art", max_seq_len=64)
    q = art.manifest["quantization"]
    assert len(q["layers"]) == 14 and list(q["kept"]) == ["lm_head"]
    assert "imported=true" in art.manifest["pipeline"]
    hf = _hf(ckpt)
    ids = random_ids(2, 9)
    with torch.no_grad():
        theirs = hf(ids).logits
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "art" / "model.safetensors"))
    for layer, cfg in q["layers"].items():  # the artifact's dequantized weights are transformers'
        scheme = handler(cfg["scheme"])
        tensors = {k.rsplit(".", 1)[1]: v for k, v in weights.items() if k.rsplit(".", 1)[0] == layer}
        mine = scheme.dequantize(tensors, scheme.make_config(**{k: v for k, v in cfg.items() if k != "scheme"}))
        assert torch.equal(hf.get_submodule(layer).weight.float(), mine), layer
    torch.testing.assert_close(lmforge.load(tmp_path / "art").forward(ids).float(), theirs.float(),
                               atol=0.1 if preset == "FP8_DYNAMIC" else FP32_ATOL, rtol=0)


def test_round_trip_is_byte_identical(tmp_path):
    from safetensors.torch import load_file

    from tests.conftest import make_model

    lmforge.optimize(make_model("qwen2"), tmp_path / "a1", dtype="bfloat16", max_seq_len=64, quant="int4",
                     group_size=32, zero_points="int")
    lmforge.export(tmp_path / "a1", format="hf", output_dir=tmp_path / "h1")
    lmforge.optimize(tmp_path / "h1", tmp_path / "a2", max_seq_len=64)
    lmforge.export(tmp_path / "a2", format="hf", output_dir=tmp_path / "h2")
    one, two = (load_file(str(tmp_path / h / "model.safetensors")) for h in ("h1", "h2"))
    assert one.keys() == two.keys()
    for key in one:
        assert one[key].dtype == two[key].dtype and torch.equal(one[key], two[key]), key
    a1, a2 = (json.loads((tmp_path / a / "manifest.json").read_text()) for a in ("a1", "a2"))
    assert a2["dtype"] == "bfloat16" and a1["quantization"]["layers"].keys() == a2["quantization"]["layers"].keys()
    for layer, cfg in a2["quantization"]["layers"].items():  # the same settings; made by "rtn", now "checkpoint"
        assert cfg == {**a1["quantization"]["layers"][layer], "method": "checkpoint"}


def test_what_the_import_refuses(tmp_path):
    model = _tiny_llama()
    ckpt = _ct_checkpoint(model, "W4A16", tmp_path / "ckpt", group_size=32)
    with pytest.raises(LmforgeError, match="already quantized .*without quant"):
        lmforge.optimize(ckpt, tmp_path / "a", quant="int4")
    with pytest.raises(LmforgeError, match="would not keep the checkpoint's values in bfloat16"):
        lmforge.optimize(ckpt, tmp_path / "b", dtype="bfloat16")  # float32 scales
    w8g = _ct_checkpoint(model, "W8A16", tmp_path / "w8g")  # 8 bits in groups of 128
    with pytest.raises(LmforgeError, match="8-bit int group weights have no lmforge scheme"):
        lmforge.optimize(w8g, tmp_path / "e")
    g16 = _ct_checkpoint(model, "W4A16", tmp_path / "g16", group_size=16)
    with pytest.raises(LmforgeError, match="group size 16; lmforge's int4 takes 32, 64, 128, 256"):
        lmforge.optimize(g16, tmp_path / "c")
    w8a8 = _ct_checkpoint(model, "W4A16", tmp_path / "w8a8", group_size=32)
    cfg = json.loads((w8a8 / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {
        "num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    (w8a8 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LmforgeError, match="quantized activations have no lmforge scheme"):
        lmforge.optimize(w8a8, tmp_path / "d")
    with pytest.raises(LmforgeError, match="needs a quantized checkpoint's tensors"):
        lmforge.optimize(model, tmp_path / "f", pipeline="quantize{scheme=int4,imported=true}")
    assert not any((tmp_path / n).exists() for n in "abcdef")
