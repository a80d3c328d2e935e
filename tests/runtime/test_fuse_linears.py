"""fuse-linears: the linear layers on one input become one linear layer and a split, with the logits unchanged.

Llama (GQA), Qwen2 (q/k/v biases, one key/value head), Mistral and GPT-2 (q/k/v already fused in c_attn:
nothing to do) against Hugging Face eager through prefill and decode; int4 and fp8 layers against the same
graph unfused (fusion is exact up to summation order); the groups counted from the HF modules; the fused
weights are the members' concatenated; the groups that must stay apart (other inputs, other dtypes, biases on
some members only, another int4 group size) do; an artifact saves and loads; shard{tp=2} cuts the fused layers
per piece.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import lmforge
import lmforge.runtime.fuse_linears  # noqa: F401  (registers the pass)
from lmforge.errors import PassError
from lmforge.ir.capture import capture
from lmforge.ir.linear import find_linears
from lmforge.ir.pass_manager import check_order
from lmforge.ir.printer import format_ir
from lmforge.passes import PassManager, default_pipeline, format_pipeline, parse_pipeline
from lmforge.passes.shard import for_rank
from tests.conftest import make_model, random_ids, run_ranks
from tests.ir.test_capture import assert_matches_hf, run_chunks

aten = torch.ops.aten
SPLIT = aten.split_with_sizes.default
CHUNKS = [5, 1, 3]  # a prefill, then decode steps of one and of three tokens
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # HF's modules that read one input

_models: dict[str, torch.nn.Module] = {}
_captured: dict[str, object] = {}


def _model(arch: str) -> torch.nn.Module:
    if arch not in _models:
        _models[arch] = make_model(arch)
    return _models[arch]


def _captured_copy(arch: str):
    """A copy of the arch's captured graph (captured once per arch)."""
    if arch not in _captured:
        _captured[arch] = capture(_model(arch))
    return copy.deepcopy(_captured[arch])


def _run(arch: str, pipeline):
    """The arch's captured graph after `pipeline`."""
    ir = _captured_copy(arch)
    PassManager(pipeline).run(ir)
    return ir


def _pipeline(dtype: str | None = None, quant: str | None = None, fuse: bool = True):
    """The default pipeline with fuse-linears where it goes: after constant-fold (and cse), before the last dce."""
    options = parse_pipeline(f"quantize{{{quant}}}")[0].options if quant else None
    steps = default_pipeline(dtype, 64, options)
    return steps[:-1] + parse_pipeline("fuse-linears") + steps[-1:] if fuse else steps


def _stats(ir) -> dict[str, int]:
    return next(h["stats"] for h in ir.history if h["pass"] == "fuse-linears")


def _hf_groups(model) -> list[list[str]]:
    """The HF layers that read one input, two or more: per decoder layer, q/k/v and gate/up where they exist."""
    groups = []
    for name, module in model.named_modules():
        for members in GROUPS:
            found = [f"{name}.{m}" for m in members if isinstance(getattr(module, m, None), torch.nn.Linear)]
            if len(found) > 1:
                groups.append(found)
    return groups


def _weights_by_name(ir) -> dict[str, torch.Tensor]:
    return {ir.weight_names[attr]: t for attr, t in ir.weights().items()}


def _fused_name(members: list[str]) -> str:
    prefix = members[0].rsplit(".", 1)[0]
    return prefix + "." + "+".join(m.rsplit(".", 1)[1] for m in members)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_fused_and_match_hf(arch):
    model = _model(arch)
    ir = _run(arch, _pipeline())
    groups = _hf_groups(model)
    assert _stats(ir) == {"groups": len(groups), "linears": sum(map(len, groups))}
    if arch == "gpt2":  # c_attn is q/k/v in one Conv1D already; c_attn and c_fc read different inputs
        assert not groups and format_ir(ir) == format_ir(_run(arch, _pipeline(fuse=False)))
    else:
        assert len(groups) == 2 * model.config.num_hidden_layers  # q/k/v and gate/up in every layer
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    sizes = {3: [cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.num_key_value_heads * hd],
             2: [cfg.intermediate_size] * 2} if arch != "gpt2" else {}
    splits = [n for n in ir.graph.nodes if n.target is SPLIT]
    assert sorted(n.args[1] for n in splits) == sorted(sizes[len(g)] for g in groups)
    assert all(n.args[2] == -1 and len(n.users) == len(n.args[1]) for n in splits)
    # the fused layer's tensors are its members' concatenated along the output features, saved under a name
    # that lists them; the members' own tensors are gone
    hf, weights = dict(model.named_parameters()), _weights_by_name(ir)
    for members in groups:
        for suffix in ("weight", "bias"):
            if f"{members[0]}.{suffix}" in hf:
                want = torch.cat([hf[f"{m}.{suffix}"] for m in members])
                assert torch.equal(weights.pop(f"{_fused_name(members)}.{suffix}"), want)
                assert not any(f"{m}.{suffix}" in weights for m in members)
    # the other linear layers are those on inputs no other layer reads (o_proj, down_proj, lm_head), as they were
    if arch != "gpt2":
        layers = {ir.weight_names[lin.weight.target].removesuffix(".weight") for lin in find_linears(ir.graph)}
        alone = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {m for g in groups for m in g}
        assert layers == alone | {_fused_name(g) for g in groups}
    assert_matches_hf(ir, model, random_ids(2, sum(CHUNKS)), CHUNKS)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bfloat16_matches_hf_and_the_unfused_graph(arch):
    model = _model(arch)
    ir, plain = _run(arch, _pipeline("bfloat16")), _run(arch, _pipeline("bfloat16", fuse=False))
    assert _stats(ir)["groups"] == len(_hf_groups(model))
    ids = random_ids(2, sum(CHUNKS))
    assert_matches_hf(ir, model, ids, CHUNKS, "bfloat16")
    got, want = run_chunks(ir, ids, CHUNKS).float(), run_chunks(plain, ids, CHUNKS).float()
    assert (got - want).abs().max() <= 0.01 * want.abs().max()  # bf16 matmuls of other widths round alike


@pytest.mark.parametrize("arch,quant", [("llama", "scheme=int4,group_size=32,skip="),
                                        ("qwen2", "scheme=int4,group_size=32,symmetric=true"),
                                        ("mistral", "scheme=fp8"), ("qwen2", "scheme=fp8"),
                                        ("llama", "scheme=int8,skip=")])
def test_quantized_layers_fuse_exactly(arch, quant):
    """int4 (asymmetric with per-group zero points, symmetric without), fp8 and int8 layers fuse by their linear forms:
    every tensor concatenated along its out axis; the logits are the unfused graph's, and the quantization
    record lists the fused layers, whose tensors the graph holds under `<layer>.<suffix>`."""
    model = _model(arch)
    ir, plain = _run(arch, _pipeline(quant=quant)), _run(arch, _pipeline(quant=quant, fuse=False))
    groups = _hf_groups(model)
    assert _stats(ir) == {"groups": len(groups), "linears": sum(map(len, groups))}
    op = getattr(torch.ops.lmforge, f"{quant.split(',')[0].removeprefix('scheme=')}_linear").default
    assert sum(n.target is op for n in ir.graph.nodes) == sum(n.target is op for n in plain.graph.nodes) - sum(
        len(g) - 1 for g in groups)
    ids = random_ids(2, sum(CHUNKS))
    torch.testing.assert_close(run_chunks(ir, ids, CHUNKS), run_chunks(plain, ids, CHUNKS), rtol=0, atol=1e-5)
    layers, before = ir.quantization["layers"], plain.quantization["layers"]
    fused = {_fused_name(g): g for g in groups}
    assert set(layers) == (set(before) - {m for g in groups for m in g}) | set(fused)
    weights, unfused = _weights_by_name(ir), _weights_by_name(plain)
    for layer, members in fused.items():
        assert layers[layer] == before[members[0]]
        for suffix in ("qweight", "scales", "zeros", "bias"):
            if f"{members[0]}.{suffix}" in unfused:
                want = torch.cat([unfused[f"{m}.{suffix}"] for m in members])
                assert torch.equal(weights[f"{layer}.{suffix}"], want)
    assert all(f"{layer}.qweight" in weights for layer in layers)


def test_rotary_and_rmsnorm_still_fuse_when_it_runs_first():
    """Before the later fusions (right after convert-dtype) it works as well: rotary still fuses on the q and k
    coming out of the split, the norms on the input the fused layers share, the gated MLP on gate and up."""
    steps = _pipeline("bfloat16", fuse=False)
    at = next(i for i, s in enumerate(steps) if s.name == "convert-dtype") + 1
    ir = _run("llama", steps[:at] + parse_pipeline("fuse-linears") + steps[at:])
    plain = _run("llama", steps)
    later = [s.name for s in steps[at:] if s.name.startswith("fuse-")]  # fuse-rmsnorm, fuse-rotary, (fuse-glu)
    assert {"fuse-rmsnorm", "fuse-rotary"} <= set(later)
    for name in later:
        assert next(h["stats"] for h in ir.history if h["pass"] == name) == next(
            h["stats"] for h in plain.history if h["pass"] == name)
    rotary = [n for n in ir.graph.nodes if n.target is torch.ops.lmforge.rotary.default]
    layers = _model("llama").config.num_hidden_layers
    assert len(rotary) == 2 * layers
    # rotary(transpose(view(split[i]))): q (piece 0) and k (piece 1) of each layer's fused q/k/v
    pieces = sorted(n.args[0].args[0].args[0].args[1] for n in rotary)
    assert pieces == [0] * layers + [1] * layers
    assert_matches_hf(ir, _model("llama"), random_ids(2, sum(CHUNKS)), CHUNKS, "bfloat16")


# --- what must stay apart --------------------------------------------------------------------------------


def _find(ir, weight: str):
    """The linear layer whose first weight is saved as `weight`."""
    return next(lin for lin in find_linears(ir.graph) if ir.weight_names[lin.weight.target] == weight)


def _fuse(ir):
    """(the graph before, after) fuse-linears; the logits must not change either way."""
    before = copy.deepcopy(ir)
    PassManager("fuse-linears,dce").run(ir)
    ids = random_ids(1, 6)
    torch.testing.assert_close(run_chunks(ir, ids, [4, 2]), run_chunks(before, ids, [4, 2]), rtol=0, atol=1e-5)
    return before, ir


def test_linears_on_different_inputs_stay_apart():
    """k_proj reading a copy of the input q_proj and v_proj read: q and v fuse, k stays alone."""
    ir = _run("llama", _pipeline(fuse=False))
    k = _find(ir, "model.layers.0.self_attn.k_proj.weight")
    with ir.graph.inserting_before(k.node):
        copied = ir.graph.call_function(aten.clone.default, (k.x,))
    copied.meta["spec"] = k.x.meta["spec"]
    k.node.replace_input_with(k.x, copied)
    ir.gm.recompile()
    _, ir = _fuse(ir)
    layers = _model("llama").config.num_hidden_layers
    assert _stats(ir) == {"groups": 2 * layers, "linears": 5 * layers - 1}
    names = set(ir.weight_names.values())
    assert {"model.layers.0.self_attn.q_proj+v_proj.weight", "model.layers.0.self_attn.k_proj.weight",
            "model.layers.1.self_attn.q_proj+k_proj+v_proj.weight"} <= names


def test_biases_on_some_members_only_stay_apart():
    """Qwen2 without its k_proj bias: q/k/v are left whole (no zero bias is made up), gate/up still fuse."""
    ir = _run("qwen2", _pipeline(fuse=False))
    for lin in find_linears(ir.graph):
        if ir.weight_names[lin.weight.target].endswith("k_proj.weight"):
            lin.node.args = lin.node.args[:2]
    ir.gm.recompile()
    before, ir = _fuse(ir)
    layers = _model("qwen2").config.num_hidden_layers
    assert _stats(ir) == {"groups": layers, "linears": 2 * layers, "unfused: biases on some members only": layers}
    assert "model.layers.0.self_attn.q_proj.bias" in ir.weight_names.values()


def test_different_weight_dtypes_stay_apart():
    """int4 k_proj with bfloat16 scales and zero points, q/v with float32 ones: q/k/v are left whole."""
    ir = _run("llama", f"remove-noops,dce,fuse-attention,quantize{{scheme=int4,group_size=32}}")
    k = _find(ir, "model.layers.0.self_attn.k_proj.qweight")
    for get in k.node.args[2:4]:
        ir.set_weight(get.target, ir.weight(get.target).bfloat16())
        get.meta["spec"] = type(get.meta["spec"])(get.meta["spec"].shape, torch.bfloat16)
    _, ir = _fuse(ir)
    layers = _model("llama").config.num_hidden_layers
    assert _stats(ir) == {"groups": 2 * layers - 1, "linears": 5 * layers - 3,
                          "unfused: different weight dtypes or shapes": 1}
    assert "model.layers.0.self_attn.k_proj" in ir.quantization["layers"]
    assert "model.layers.1.self_attn.q_proj+k_proj+v_proj" in ir.quantization["layers"]


def _add_to_logits(ir, value, spec) -> None:
    """Make the graph also read `value` (inserted as `spec`): its sum, times zero, is added to the logits."""
    from lmforge.ir.spec import TensorSpec

    graph = ir.graph
    out = next(n for n in graph.nodes if n.op == "output")
    logits = out.args[0][0]
    with graph.inserting_before(out):
        node = graph.call_function(*value) if isinstance(value, tuple) else value
        total = graph.call_function(aten.sum.default, (node,))
        zero = graph.call_function(aten.mul.Tensor, (total, 0.0))
        added = graph.call_function(aten.add.Tensor, (logits, zero))
    if isinstance(value, tuple):
        node.meta["spec"] = spec
    total.meta["spec"] = zero.meta["spec"] = TensorSpec((), torch.float32)
    added.meta["spec"] = logits.meta["spec"]
    out.args = ((added,),)
    ir.gm.recompile()


def test_output_flattened_across_its_last_axis_stays_apart():
    """A split piece is strided: a view that merges its features with the tokens (here k_proj's output
    flattened) would fail on it, so that group stays whole."""
    from lmforge.ir.spec import TensorSpec

    ir = _run("llama", _pipeline(fuse=False))
    k = _find(ir, "model.layers.0.self_attn.k_proj.weight")
    _add_to_logits(ir, (aten.view.default, (k.node, [-1])), TensorSpec(("batch*seq*32",), torch.float32))
    _, ir = _fuse(ir)
    layers = _model("llama").config.num_hidden_layers
    assert _stats(ir) == {"groups": 2 * layers - 1, "linears": 5 * layers - 3,
                          "unfused: an output reshaped across its last axis": 1}


def test_a_weight_read_elsewhere_stays():
    """k_proj's weight is also read by another node (as a tied table would be): the layer fuses, from a copy,
    and the weight stays for that reader; the others are dropped."""
    ir = _run("llama", _pipeline(fuse=False))
    k = _find(ir, "model.layers.0.self_attn.k_proj.weight")
    with ir.graph.inserting_before(k.node):
        get = ir.graph.get_attr(k.weight.target)
    get.meta["spec"] = k.weight.meta["spec"]
    _add_to_logits(ir, get, None)
    _, ir = _fuse(ir)
    layers = _model("llama").config.num_hidden_layers
    assert _stats(ir) == {"groups": 2 * layers, "linears": 5 * layers}
    names = set(ir.weight_names.values())
    assert {"model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.q_proj+k_proj+v_proj.weight"} <= names
    assert not {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"} & names


def test_layers_that_share_weights_share_the_fused_weight():
    """Layer 1's q/k/v made to read layer 0's weights (weights shared across layers): both groups fuse, onto one
    concatenated tensor."""
    ir = _run("llama", _pipeline(fuse=False))
    for p in ("q", "k", "v"):
        ours, theirs = (_find(ir, f"model.layers.{i}.self_attn.{p}_proj.weight") for i in (0, 1))
        with ir.graph.inserting_before(theirs.node):
            get = ir.graph.get_attr(ours.weight.target)
        get.meta["spec"] = ours.weight.meta["spec"]
        theirs.node.replace_input_with(theirs.weight, get)
    ir.graph.eliminate_dead_code()
    ir.prune_weights()
    ir.gm.recompile()
    _, ir = _fuse(ir)
    assert _stats(ir)["groups"] == 2 * _model("llama").config.num_hidden_layers
    fused = [n.args[1].target for n in ir.graph.nodes if n.target is aten.linear.default
             and "q_proj+k_proj+v_proj" in ir.weight_names[n.args[1].target]]
    assert len(fused) == 2 and len(set(fused)) == 1


def test_other_int4_group_size_stays_apart():
    ir = _run("llama", _pipeline(quant="scheme=int4,group_size=32,overrides=*.k_proj:g64"))
    layers = _model("llama").config.num_hidden_layers
    assert _stats(ir) == {"groups": layers, "linears": 2 * layers, "unfused: different non-tensor arguments": layers}
    assert ir.quantization["layers"]["model.layers.0.self_attn.k_proj"]["group_size"] == 64
    assert "model.layers.0.mlp.gate_proj+up_proj" in ir.quantization["layers"]
    plain = _run("llama", _pipeline(quant="scheme=int4,group_size=32,overrides=*.k_proj:g64", fuse=False))
    ids = random_ids(1, 6)
    torch.testing.assert_close(run_chunks(ir, ids, [4, 2]), run_chunks(plain, ids, [4, 2]), rtol=0, atol=1e-5)


def test_order_is_enforced():
    """The weights must be final: quantize and fuse-attention cannot follow it. (It may follow shard: at load,
    each rank fuses its own slices.)"""
    for text, missing in (("fuse-linears,quantize{scheme=int4}", "unquantized"),
                          ("fuse-linears,fuse-attention", "source-dtype")):
        assert missing in check_order(parse_pipeline(text))
    assert check_order(_pipeline("bfloat16", "scheme=int4") + parse_pipeline("shard{tp=2}")) is None
    with pytest.raises(PassError, match="requires"):
        PassManager("fuse-linears,quantize{scheme=fp8}").run(_captured_copy("llama"))


# --- artifacts and tensor parallelism ---------------------------------------------------------------------


def test_artifact_saves_and_loads(tmp_path):
    model = _model("qwen2")
    text = format_pipeline(_pipeline())
    art = lmforge.optimize(model, tmp_path / "fp32", max_seq_len=64, pipeline=text)
    ids = random_ids(2, 7)
    with torch.no_grad():
        want = model(ids).logits
    torch.testing.assert_close(lmforge.load(art.path).forward(ids), want, rtol=1e-4, atol=1e-4)
    keys = set(load_file(str(art.path / "model.safetensors")))
    assert {"model.layers.1.self_attn.q_proj+k_proj+v_proj.bias", "model.layers.1.mlp.gate_proj+up_proj.weight"} <= keys
    assert not any(".q_proj." in k or ".up_proj." in k for k in keys)
    step = next(p for p in art.manifest["passes"] if p["pass"] == "fuse-linears")
    assert step["stats"]["groups"] == len(_hf_groups(model))
    # int4: the manifest lists the fused layers, each of whose tensors the weights file holds
    text = format_pipeline(_pipeline(quant="scheme=int4,group_size=32"))
    fused = lmforge.optimize(model, tmp_path / "int4", max_seq_len=64, pipeline=text)
    plain = lmforge.optimize(model, tmp_path / "plain", max_seq_len=64, pipeline=text.replace(",fuse-linears", ""))
    torch.testing.assert_close(lmforge.load(fused.path).forward(ids), lmforge.load(plain.path).forward(ids),
                               rtol=0, atol=1e-5)
    layers = fused.manifest["quantization"]["layers"]
    assert "model.layers.0.self_attn.q_proj+k_proj+v_proj" in layers and "model.layers.0.self_attn.q_proj" not in layers
    keys = set(load_file(str(fused.path / "model.safetensors")))
    assert all(f"{layer}.qweight" in keys and f"{layer}.scales" in keys for layer in layers)
    assert fused.manifest["params"] == plain.manifest["params"]


def test_shard_cuts_the_fused_layers_per_piece():
    """shard{tp=2} after fuse-linears on Llama (4 query heads, 2 key/value heads): each rank keeps its query
    heads, its key/value head and its half of gate and of up, out of the fused weights; prefill and decode on
    the two ranks give HF's logits."""
    model = _model("llama")
    ir = _run("llama", _pipeline() + parse_pipeline("shard{tp=2}"))
    assert ir.tensor_parallel.replicated == {}
    hf = dict(model.named_parameters())
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    q, kv, inter = cfg.num_attention_heads * hd // 2, cfg.num_key_value_heads * hd // 2, cfg.intermediate_size // 2
    attn, mlp = "model.layers.0.self_attn", "model.layers.0.mlp"
    qkv = next(a for a, n in ir.weight_names.items() if n == f"{attn}.q_proj+k_proj+v_proj.weight")
    gate_up = next(a for a, n in ir.weight_names.items() if n == f"{mlp}.gate_proj+up_proj.weight")
    for r in range(2):  # rank r's rows of each piece, in whole heads (one key/value head each)
        rows = (("q", q), ("k", kv), ("v", kv))
        want = torch.cat([hf[f"{attn}.{p}_proj.weight"][n * r:n * (r + 1)] for p, n in rows])
        assert torch.equal(ir.tensor_parallel.rank_weights[r][qkv], want)
        want = torch.cat([hf[f"{mlp}.{p}_proj.weight"][inter * r:inter * (r + 1)] for p in ("gate", "up")])
        assert torch.equal(ir.tensor_parallel.rank_weights[r][gate_up], want)
    layers = cfg.num_hidden_layers
    splits = sorted(n.args[1] for n in ir.graph.nodes if n.target is SPLIT)
    assert splits == sorted([[q, kv, kv]] * layers + [[inter] * 2] * layers)
    ids = random_ids(2, sum(CHUNKS))
    with torch.no_grad():
        want = model(ids).logits
    for got in run_ranks(lambda r: run_chunks(for_rank(ir, r), ids, CHUNKS), 2):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
