"""The load pipeline (`lmforge/runtime/load.py`): which passes run for a device and layout, in which order; that
they are registered passes the manager records and verifies around; that `prepare` keeps the model equal to
Hugging Face eager; and that prepare-kernels widens an int4 artifact's scales for the CPU kernel."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.codegen import cpu_gemv
from lmforge.codegen.quant_linear import int4_linear, int4_linear_impl
from lmforge.errors import PassError
from lmforge.ir.ops import op_facts
from lmforge.ir.pass_manager import PROPERTIES, PassManager, check_order, format_pipeline, parse_pipeline, registered_passes
from lmforge.ir.spec import TensorSpec
from lmforge.ir.verify import VerifyError
from lmforge.runtime import bind, fuse_linears, fuse_qkv_attention, layout, load
from lmforge.runtime.artifact import load_graph, read_manifest
from lmforge.runtime.load import LOADED, load_pipeline, prepare
from tests.conftest import make_model, random_ids
from tests.ir.test_capture import run_chunks

aten = torch.ops.aten
STEPS = ["retarget", "fuse-linears", "weight-layout", "prepare-kernels", "fuse-qkv-attention", "bind-cpu-kernels"]  # the order they run in
CPU = torch.device("cpu")


def _graph(path):
    """The artifact's graph as `lmforge.load` reads it, before the load pipeline."""
    return load_graph(read_manifest(Path(path)))


@pytest.mark.parametrize("device, weight_layout, pipeline", [
    ("cpu", "source", "fuse-linears,prepare-kernels,fuse-qkv-attention,bind-cpu-kernels"),
    ("cpu", "transposed", "fuse-linears,weight-layout{layout=transposed},prepare-kernels,fuse-qkv-attention,"
                          "bind-cpu-kernels"),
    ("cpu", "gemv", "fuse-linears,weight-layout{layout=gemv},prepare-kernels,fuse-qkv-attention,bind-cpu-kernels"),
    ("cuda:0", "source", "retarget{device=cuda:0},fuse-linears"),
    ("cuda:1", "transposed", "retarget{device=cuda:1},fuse-linears,weight-layout{layout=transposed}"),
])
def test_pipeline_for_device_and_layout(device, weight_layout, pipeline):
    """A CPU engine widens int4 scales and binds kernels, a GPU one retargets tensor creations; a layout other
    than the source one adds weight-layout; the string parses back to itself."""
    text = load_pipeline(torch.device(device), weight_layout)
    assert text == pipeline
    assert format_pipeline(parse_pipeline(text)) == text


def test_pipeline_steps_keep_their_order():
    """For every device and layout the steps are a subsequence of retarget, weight-layout, prepare-kernels,
    fuse-qkv-attention, bind-cpu-kernels, with the options they were given, and may run on a loaded graph in that order."""
    for device, weight_layout in itertools.product(["cpu", "cuda", "cuda:1"], layout.LAYOUTS):
        steps = parse_pipeline(load_pipeline(torch.device(device), weight_layout))
        names = [s.name for s in steps]
        assert names == [name for name in STEPS if name in names], (device, weight_layout)
        assert ("weight-layout" in names) == (weight_layout != "source")
        for step in steps:
            if step.name == "weight-layout":
                assert step.options.layout == weight_layout
            elif step.name == "retarget":
                assert torch.device(step.options.device) == torch.device(device)
        assert check_order(steps, LOADED) is None
    assert check_order(parse_pipeline(",".join(STEPS)), LOADED) is None


def test_load_passes_are_registered():
    """Each step is a pass of the manager's registry, needing only specs and keeping every property."""
    passes = registered_passes()
    functions = {"retarget": load.retarget, "fuse-linears": fuse_linears.fuse_linears,
                 "weight-layout": load.weight_layout, "prepare-kernels": load.prepare_kernels,
                 "fuse-qkv-attention": fuse_qkv_attention.fuse_qkv_attention, "bind-cpu-kernels": load.bind_cpu_kernels}
    for name in STEPS:
        info = passes[name]
        assert info.fn is functions[name]
        # fuse-linears' weights are final: neither quantize nor fuse-attention may follow it
        kept = PROPERTIES - {"unquantized", "source-dtype"} if name == "fuse-linears" else PROPERTIES
        assert info.requires == {"specs"} and info.preserves == kept and not info.establishes
    assert passes["retarget"].options().device == "cpu" and passes["weight-layout"].options().layout == "source"


@pytest.mark.parametrize("weight_layout", ["source", "transposed"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"], indirect=True)
def test_prepare_matches_hf_and_records_each_pass(arch, weight_layout, artifacts, hf_model):
    """`prepare` on a loaded float32 artifact: the graph computes Hugging Face eager's logits (1e-4), and each
    pass of the pipeline is appended to the graph's history, in order, with what it did."""
    ir = _graph(artifacts(arch))
    history = len(ir.history)
    linears = sum(n.target is aten.linear.default for n in ir.graph.nodes)
    bindable = sum(n.op == "call_function" and getattr(op_facts(n.target), "cpu", None) is not None
                   for n in ir.graph.nodes)
    layers = hf_model.config.num_hidden_layers
    assert prepare(ir, CPU, weight_layout) is ir
    added = ir.history[history:]
    assert [h["pass"] for h in added] == load_pipeline(CPU, weight_layout).split(",")
    stats = {h["pass"].split("{")[0]: h["stats"] for h in added}
    assert stats["prepare-kernels"] == {}  # nothing quantized
    if arch == "gpt2":  # its q/k/v come from one Conv1D's split(.Tensor) (3 per layer, its attention included)
        assert stats["fuse-qkv-attention"] == {"fused": 0, "unfused: q, k and v are not pieces of one fused projection": layers}
    else:  # each layer's 2 rotaries, attention and 3 views become one op
        assert stats["fuse-qkv-attention"] == {"fused": layers}
        bindable -= 2 * layers
    assert stats["bind-cpu-kernels"] == {"bound": bindable} and bindable > 0
    fused = stats["fuse-linears"]
    assert fused["groups"] == (0 if arch == "gpt2" else 2 * hf_model.config.num_hidden_layers)  # q/k/v, gate/up
    linears -= fused["linears"] - fused["groups"]
    if weight_layout == "transposed":
        assert stats["weight-layout"] == {"transposed-linears": linears} and linears > 0
        assert not any(n.target is aten.linear.default for n in ir.graph.nodes)
    ids = random_ids(2, 9)
    with torch.no_grad():
        want = hf_model(ids).logits
    torch.testing.assert_close(run_chunks(ir, ids, [9]), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run_chunks(ir, ids, [6, 1, 2]), want, rtol=1e-4, atol=1e-4)  # through the cache


@pytest.fixture(scope="module")
def unfused_artifact(tmp_path_factory):
    """A gpt2 artifact from a pipeline without fuse-attention and constant-fold: its graph still creates
    tensors (aranges, masks) on the CPU at run time."""
    out = tmp_path_factory.mktemp("load-unfused") / "art"
    return lmforge.optimize(make_model("gpt2"), out, max_seq_len=64, pipeline="remove-noops,dce").path


def test_retarget_points_tensor_creations_at_the_device(unfused_artifact):
    """For a GPU the only pass is retarget: every tensor creation on the CPU moves to the device; nothing else
    (weights, other nodes) changes. Runs without a GPU: the graph is rewritten, not run."""
    ir = _graph(unfused_artifact)
    created = [n for n in ir.graph.nodes if isinstance(n.kwargs.get("device"), torch.device)]
    assert any(n.target is aten.arange.default for n in created) and all(n.kwargs["device"] == CPU for n in created)
    weights = dict(ir.weights())
    targets = [(n.target, n.args) for n in ir.graph.nodes]
    prepare(ir, torch.device("cuda:0"), "source")
    step = next(h for h in reversed(ir.history) if h["pass"].startswith("retarget"))
    assert step["pass"] == "retarget{device=cuda:0}"
    assert step["stats"] == {"retargeted": len(created)} and step["changed"]
    assert all(n.kwargs["device"] == torch.device("cuda:0") for n in created)
    assert [(n.target, n.args) for n in ir.graph.nodes] == targets
    assert all(ir.weight(a) is t and t.device == CPU for a, t in weights.items())
    prepare(ir, torch.device("cuda:0"), "source")  # a second time there is nothing left to move
    step = next(h for h in reversed(ir.history) if h["pass"].startswith("retarget"))
    assert step["stats"] == {"retargeted": 0} and not step["changed"]


def test_a_broken_graph_is_refused_before_any_pass(artifacts):
    """The manager verifies the loaded graph first: a broken one fails, naming the node and the rule, before
    any load pass has run (the history is unchanged)."""
    ir = _graph(artifacts("llama"))
    history = list(ir.history)
    weight = next(n for n in ir.graph.nodes if n.op == "get_attr")
    weight.meta["spec"] = TensorSpec((1, 2, 3), torch.float32)  # no longer the weight's shape
    with pytest.raises(VerifyError, match=rf"node %{weight.name} breaks 'weight-spec'.*\(before the pipeline\)"):
        prepare(ir, CPU, "transposed")
    assert ir.history == history


def test_a_load_pass_that_breaks_the_graph_is_caught(artifacts, monkeypatch):
    """A load pass that leaves a broken graph is caught by the verifier after the pipeline."""
    ir = _graph(artifacts("llama"))

    def bind_badly(ir, device):
        lin = next(n for n in ir.graph.nodes if n.target is aten.linear.default)
        lin.args[1].meta["spec"] = TensorSpec(lin.args[1].meta["spec"].shape, torch.bfloat16)
        return 1

    monkeypatch.setattr(bind, "bind_cpu_kernels", bind_badly)
    with pytest.raises(VerifyError, match=r"breaks 'weight-spec'.*\(after the pipeline\)"):
        prepare(ir, CPU, "source")


@pytest.mark.parametrize("name, module, function", [
    ("weight-layout", layout, "apply_layout"),
    ("prepare-kernels", load, "op_facts"),
    ("bind-cpu-kernels", bind, "bind_cpu_kernels"),
])
def test_a_failing_load_pass_is_named(name, module, function, artifacts, monkeypatch):
    """A load pass that fails is reported as a PassError naming it and the passes that ran before it."""
    ir = _graph(artifacts("llama"))

    def fail(*args):
        raise RuntimeError("out of luck")

    monkeypatch.setattr(module, function, fail)
    before = {"weight-layout": " (after fuse-linears)", "prepare-kernels": " (after fuse-linears, weight-layout)",
              "bind-cpu-kernels": " (after fuse-linears, weight-layout, prepare-kernels, fuse-qkv-attention)"}[name]
    with pytest.raises(PassError, match="^" + re.escape(f"pass '{name}' failed{before}: out of luck") + "$"):
        prepare(ir, CPU, "transposed")


@pytest.fixture(scope="module")
def int4_artifact(tmp_path_factory):
    """A bfloat16 int4 artifact of the tiny llama: its scales and zero points are stored in bfloat16."""
    out = tmp_path_factory.mktemp("load-int4") / "art"
    return lmforge.optimize(make_model("llama"), out, max_seq_len=64, dtype="bfloat16", quant="int4",
                            group_size=32).path


@pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler to build the CPU kernel")
def test_prepare_kernels_keeps_bfloat16_int4_scales(int4_artifact):
    """The CPU kernel reads bfloat16 scales and zero points as they are stored: prepare-kernels leaves them."""
    ir = _graph(int4_artifact)
    PassManager("prepare-kernels,bind-cpu-kernels").run(ir, properties=LOADED)
    step = next(h for h in ir.history if h["pass"] == "prepare-kernels")
    assert "prepared-int4_linear" not in step["stats"]
    nodes = [n for n in ir.graph.nodes if n.target is int4_linear_impl]
    assert len(nodes) == len(ir.quantization["layers"]) > 0
    assert all(n.args[i].meta["spec"].dtype == torch.bfloat16 == ir.weight(n.args[i].target).dtype
               for n in nodes for i in (2, 3))


@pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler to build the CPU kernel")
def test_prepare_kernels_widens_float16_int4_scales(tmp_path):
    """float16 scales and zero points, which the CPU kernel does not read, become float32 at load (the old
    copies are dropped) and prepare-kernels says so in its stats; the logits stay what the unprepared graph
    computes, up to float16 rounding."""
    art = lmforge.optimize(make_model("llama"), tmp_path / "art", max_seq_len=64, dtype="float16", quant="int4",
                           group_size=32).path
    ir, plain = _graph(art), _graph(art)
    layers = ir.quantization["layers"]
    nodes = [n for n in ir.graph.nodes if n.target is int4_linear]
    assert len(nodes) == len(layers) > 0
    assert all(n.args[i].meta["spec"].dtype == torch.float16 for n in nodes for i in (2, 3))
    names = {ir.weight_names[n.args[i].target] for n in nodes for i in (2, 3)}
    PassManager("prepare-kernels,bind-cpu-kernels").run(ir, properties=LOADED)  # the CPU's steps, unfused
    step = next(h for h in ir.history if h["pass"] == "prepare-kernels")
    assert step["changed"] and step["stats"] == {"prepared-int4_linear": len(layers)}
    nodes = [n for n in ir.graph.nodes if n.target is int4_linear_impl]  # bound after widening
    assert len(nodes) == len(layers)
    for node in nodes:
        for i in (2, 3):
            assert node.args[i].meta["spec"].dtype == torch.float32 == ir.weight(node.args[i].target).dtype
    assert {ir.weight_names[n.args[i].target] for n in nodes for i in (2, 3)} == names
    assert not any(t.dtype == torch.float16 and ir.weight_names[a] in names for a, t in ir.weights().items())
    ids = random_ids(1, 7)
    got, want = run_chunks(ir, ids, [7]).float(), run_chunks(plain, ids, [7]).float()
    assert (got - want).abs().max() <= 0.005 * want.abs().max(), (got - want).abs().max()


def test_prepare_kernels_leaves_a_gpu_graph_alone(int4_artifact):
    """Off the CPU (the Triton kernels read the stored layout) the pass changes nothing."""
    ir = _graph(int4_artifact)
    PassManager("prepare-kernels{device=cuda:0}").run(ir, properties=LOADED)
    assert ir.history[-1]["pass"] == "prepare-kernels{device=cuda:0}"
    assert not ir.history[-1]["changed"] and ir.history[-1]["stats"] == {}
    assert all(n.args[i].meta["spec"].dtype == torch.bfloat16 for n in ir.graph.nodes if n.target is int4_linear
               for i in (2, 3))
