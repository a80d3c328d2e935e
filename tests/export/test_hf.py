"""`lmforge export --format hf`, checked by its real consumer: `transformers` with `compressed-tensors` loads the
export on the CPU, its dequantized weights are the artifact's, and its logits are lmforge's engine's on the same
artifact. compressed-tensors' own compressor, given the artifact's dequantized weights and parameters, must
write the same tensors byte for byte."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.errors import LmforgeError
from lmforge.quant import SCHEMES
from lmforge.quant.scheme import handler
from tests.conftest import make_model, random_ids

pytest.importorskip("compressed_tensors")

FP32_ATOL = 1e-4  # float32 logits, same dequantized weights: the two differ by summation order only (measured ~1e-6)
# fp8 rounds every layer's input to 3 mantissa bits: a float32-ulp difference before that rounding can flip one
# value by 1/16 of itself, so whole-model logits differ more (measured 0.037 on Qwen2, 7e-7 on Llama); each layer
# is also compared alone, on the consumer's own input, within FP32_ATOL
FP8_ATOL = 0.1
BF16_ATOL = 0.05  # bfloat16 logits of magnitude ~2 (measured 0.0 for int4; one bfloat16 ulp at 2 is 0.0156)

QUANT = {
    "int4-sym": dict(quant="int4", group_size=32, symmetric=True),
    "int4-asym": dict(quant="int4", group_size=32, zero_points="int"),
    "int8": dict(quant="int8"),
    "fp8": dict(quant="fp8"),
}

_made: dict[tuple, str] = {}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(arch, quant, dtype) -> (artifact, its hf export), each made once for this module."""

    def get(arch: str, quant: str | None = None, dtype: str = "float32", **extra):
        key = (arch, quant, dtype, tuple(sorted(extra.items())))
        if key not in _made:
            base = tmp_path_factory.mktemp(f"{arch}-{quant}-{dtype}")
            model = make_model(arch) if "model" not in extra else extra.pop("model")
            lmforge.optimize(model, base / "art", dtype=dtype, max_seq_len=64, **(QUANT[quant] if quant else {}),
                             **extra)
            lmforge.export(base / "art", format="hf", output_dir=base / "hf")
            _made[key] = (str(base / "art"), str(base / "hf"))
        return _made[key]

    return get


def _load_hf(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _artifact_weights(art: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    manifest = json.loads((Path(art) / "manifest.json").read_text())
    return load_file(str(Path(art) / "model.safetensors")), (manifest["quantization"] or {}).get("layers", {})


def _dequantized(weights: dict, layer: str, cfg: dict) -> torch.Tensor:
    scheme = handler(cfg["scheme"])
    tensors = {k.rsplit(".", 1)[1]: v for k, v in weights.items() if k.rsplit(".", 1)[0] == layer}
    return scheme.dequantize(tensors, scheme.make_config(**{k: v for k, v in cfg.items() if k != "scheme"}))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_unquantized_export_runs_in_transformers(made, arch):
    art, out = made(arch)
    hf = _load_hf(out)
    ids = random_ids(2, 9)
    ours = lmforge.load(art).forward(ids).float()
    torch.testing.assert_close(_logits(hf, ids), ours, atol=FP32_ATOL, rtol=0)
    assert "quantization_config" not in json.loads((Path(out) / "config.json").read_text())


@pytest.mark.parametrize("quant", ["int4-sym", "int4-asym", "int8", "fp8"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_quantized_export_runs_in_transformers(made, arch, quant):
    art, out = made(arch, quant)
    weights, layers = _artifact_weights(art)
    assert layers, "nothing was quantized"
    hf = _load_hf(out)
    seen = {}  # each quantized layer's input and output in the consumer's forward
    for name in layers:
        hf.get_submodule(name).register_forward_hook(
            lambda _m, args, y, name=name: seen.setdefault(name, (args[0].detach(), y.detach())) and None)
    ids = random_ids(2, 9)
    ours = lmforge.load(art).forward(ids).float()
    torch.testing.assert_close(_logits(hf, ids), ours, atol=FP8_ATOL if quant == "fp8" else FP32_ATOL, rtol=0)
    op = SCHEMES[layers[next(iter(layers))]["scheme"]].op
    for name, (x, y) in seen.items():  # compressed-tensors' layer (fp8: with its per-token activations) is our op
        tensors = [weights.get(f"{name}.{s}") for s in ("qweight", "scales", "zeros")]
        args = tensors if quant.startswith("int4") else tensors[:2]
        extra = (int(layers[name]["group_size"]),) if quant.startswith("int4") else ()
        torch.testing.assert_close(y, op(x, *args, *extra, weights.get(f"{name}.bias")), atol=FP32_ATOL, rtol=0)
    for layer, cfg in layers.items():  # the consumer's dequantized weights (after its first forward) are ours
        mine = _dequantized(weights, layer, cfg)
        theirs = hf.get_submodule(layer).weight.float()
        assert torch.equal(theirs, mine.to(theirs.dtype).float()), layer


def test_bfloat16_int4_export(made):
    art, out = made("qwen2", "int4-asym", "bfloat16")
    hf = _load_hf(out)
    assert hf.dtype == torch.bfloat16
    ids = random_ids(2, 9)
    torch.testing.assert_close(_logits(hf, ids), lmforge.load(art).forward(ids).float(), atol=BF16_ATOL, rtol=0)


@pytest.mark.parametrize("quant", ["int4-sym", "int4-asym", "int8", "fp8"])
def test_same_tensors_as_compressed_tensors_writes(made, quant):
    """compressed-tensors' compressor, fed the dequantized weight and the artifact's parameters, writes our bytes."""
    from safetensors.torch import load_file
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    art, out = made("llama", quant)
    weights, layers = _artifact_weights(art)
    cfg = json.loads((Path(out) / "config.json").read_text())["quantization_config"]
    qcfg = QuantizationConfig.model_validate(cfg)  # the library's own validation of our config
    exported = load_file(str(Path(out) / "model.safetensors"))
    compressor = BaseCompressor.load_from_registry(qcfg.format)
    layer, lcfg = next(iter(layers.items()))
    scheme = next(iter(qcfg.config_groups.values()))
    state = {"weight": _dequantized(weights, layer, lcfg).to(weights[f"{layer}.scales"].dtype)}
    scales = weights[f"{layer}.scales"]
    state["weight_scale"] = scales if scales.dim() == 2 else scales.reshape(-1, 1)
    if f"{layer}.zeros" in weights:  # compressed-tensors' zero point is signed: ours less 8
        state["weight_zero_point"] = (weights[f"{layer}.zeros"].float() - 8).to(torch.int8)
    theirs = compressor.compress(state, scheme)
    for key, value in theirs.items():
        if key in ("weight_scale",) or value is None:
            continue
        mine = exported[f"{layer}.{key}"]
        assert mine.dtype == value.dtype and torch.equal(mine, value.to(mine.device)), key


def test_tied_lm_head_quantized_on_its_own(made, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=131, hidden_size=64, intermediate_size=112, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True)).eval()
    art, out = tmp_path / "art", tmp_path / "hf"
    lmforge.optimize(model, art, dtype="float32", max_seq_len=64, quant="int4", group_size=32, symmetric=True,
                     skip=[])
    lmforge.export(art, format="hf", output_dir=out)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # the head is int4, the embedding stays float
    hf = _load_hf(str(out))
    ids = random_ids(1, 7)
    torch.testing.assert_close(_logits(hf, ids), lmforge.load(art).forward(ids).float(), atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(hf.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_tensor_parallel_artifact_exports_whole(made, tmp_path):
    art_tp1, out_tp1 = made("llama", "int4-sym")
    lmforge.optimize(make_model("llama"), tmp_path / "tp2", dtype="float32", max_seq_len=64, tp=2,
                     **QUANT["int4-sym"])
    lmforge.export(tmp_path / "tp2", format="hf", output_dir=tmp_path / "hf")
    from safetensors.torch import load_file

    one, two = load_file(str(Path(out_tp1) / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)


# --- what it refuses -------------------------------------------------------------------------------------


def test_fractional_zero_points_are_refused(made, tmp_path):
    lmforge.optimize(make_model("llama"), tmp_path / "art", dtype="float32", max_seq_len=64, quant="int4",
                     group_size=32)
    with pytest.raises(LmforgeError, match="fractional int4 zero points.*--zero-points int"):
        lmforge.export(tmp_path / "art", format="hf", output_dir=tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temporary left behind either


def test_quantized_gpt2_is_refused(tmp_path):
    lmforge.optimize(make_model("gpt2"), tmp_path / "art", dtype="float32", max_seq_len=64, quant="int8")
    with pytest.raises(LmforgeError, match="Conv1D"):
        lmforge.export(tmp_path / "art", format="hf", output_dir=tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_existing_output_and_bad_format_and_damage(made, tmp_path):
    art, _ = made("llama")
    (tmp_path / "taken").mkdir()
    with pytest.raises(LmforgeError, match="already exists"):
        lmforge.export(art, format="hf", output_dir=tmp_path / "taken")
    with pytest.raises(LmforgeError, match="unknown export format 'safetensors'; known: gguf, hf"):
        lmforge.export(art, format="safetensors", output_dir=tmp_path / "x")
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(art, damaged)
    data = bytearray((damaged / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (damaged / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(LmforgeError, match="sha256"):
        lmforge.export(damaged, format="hf", output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_export_and_its_errors(made, tmp_path):
    from click.testing import CliRunner

    from lmforge.cli.main import cli, main

    art, _ = made("llama", "int4-sym")
    result = CliRunner().invoke(cli, ["export", art, "--format", "hf", "-o", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert re.search(r"wrote .*hf \(\d+\.\d MB, hf\)", result.output)
    assert (tmp_path / "hf" / "config.json").is_file()
    help_text = CliRunner().invoke(cli, ["export", "--help"]).output
    assert "compressed-tensors" in help_text and "--zero-points int" in help_text
    assert main(["export", art, "--format", "hf", "-o", str(tmp_path / "hf")]) == 1  # exists: one line, exit 1
    assert main(["export", art, "--format", "gguf2", "-o", str(tmp_path / "y")]) == 2  # a bad flag
    assert main(["export", str(tmp_path / "nothing"), "--format", "hf", "-o", str(tmp_path / "z")]) == 1
