"""The pass manager: textual pipelines, properties, instruments, and errors that name the pass."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from lmforge.errors import PassError
from lmforge.ir.capture import capture
from lmforge.passes import (Instruments, PassManager, PassResult, QuantizeOptions, default_pipeline, format_pipeline,
                            load_reproducer, parse_pipeline)
from lmforge.ir import pass_manager as pm
from tests.conftest import make_model


@pytest.fixture(scope="module")
def fresh_ir():
    model = make_model("gpt2")
    return lambda: capture(model)


@pytest.fixture()
def temp_passes():
    """Register passes for one test only (the registry is the manager's, not ours to keep)."""
    added = []

    def register(name, **kw):
        added.append(name)
        return pm.register_pass(name, **kw)

    yield register
    for name in added:
        pm._REGISTRY.pop(name, None)


def test_pipeline_text_round_trips():
    text = "remove-noops,dce,convert-dtype{dtype=float16},constant-fold{max_new_bytes=64},dce"
    steps = parse_pipeline(text)
    assert [s.name for s in steps] == ["remove-noops", "dce", "convert-dtype", "constant-fold", "dce"]
    assert steps[2].options.dtype == "float16" and steps[3].options.max_new_bytes == 64
    assert format_pipeline(steps) == text
    assert format_pipeline(parse_pipeline("constant-fold{max_positions=0}")) == "constant-fold"  # defaults are not printed
    assert format_pipeline(default_pipeline("bfloat16")) == ("remove-noops,dce,fuse-attention,"
                                                             "convert-dtype{dtype=bfloat16},fuse-rmsnorm,"
                                                             "fuse-add-rmsnorm,fuse-rotary,fuse-glu,constant-fold,cse,dce")
    assert format_pipeline(default_pipeline(None, 64)) == ("remove-noops,dce,fuse-attention,fuse-rmsnorm,"
                                                           "fuse-add-rmsnorm,fuse-rotary,fuse-glu,"
                                                           "constant-fold{max_positions=64},cse,dce")


@pytest.mark.parametrize("text, message", [
    ("remove-noops,fuse-everything", "unknown pass 'fuse-everything'"),
    ("convert-dtype{precision=4}", "bad option 'precision=4' for pass 'convert-dtype'"),
    ("constant-fold{max_new_bytes=lots}", "constant-fold.max_new_bytes must be int"),
    ("convert-dtype{dtype=bfloat16", "unclosed"),
])
def test_bad_pipelines(text, message):
    with pytest.raises(PassError, match=message.replace("{", r"\{")):
        parse_pipeline(text)


def test_history_records_each_pass(fresh_ir):
    ir = fresh_ir()
    PassManager("remove-noops,dce").run(ir)
    assert [h["pass"] for h in ir.history] == ["remove-noops", "dce"]
    first = ir.history[0]
    assert first["changed"] and first["stats"]["assert"] > 0 and first["nodes_after"] < first["nodes_before"]
    assert first["seconds"] >= 0


def test_requirements_are_checked(fresh_ir, temp_passes):
    @temp_passes("needs-folded", requires=("specs", "folded"))
    def needs_folded(ir, options):
        return PassResult(False)

    @temp_passes("forgets-everything", preserves=())
    def forgets(ir, options):
        return PassResult(False)

    with pytest.raises(PassError, match=r"'needs-folded' requires \['folded'\].*\(remove-noops\)"):
        PassManager("remove-noops,needs-folded").run(fresh_ir())
    PassManager("constant-fold,needs-folded").run(fresh_ir())  # established by constant-fold
    with pytest.raises(PassError, match="requires"):
        PassManager("constant-fold,forgets-everything,needs-folded").run(fresh_ir())


def test_broken_graph_names_the_pass(fresh_ir, temp_passes, tmp_path):
    @temp_passes("breaks-dtypes", preserves=pm.PROPERTIES)  # it says it keeps the specs, and does not
    def breaks(ir, options):
        linear = next(n for n in ir.graph.nodes if n.target is torch.ops.aten.addmm.default)
        del linear.meta["spec"]  # a pass that forgets to keep specs up to date
        return PassResult(True)

    inst = Instruments(verify_each=True, reproducer_dir=tmp_path / "repro")
    with pytest.raises(PassError) as err:
        PassManager("remove-noops,breaks-dtypes,dce", inst).run(fresh_ir())
    assert "pass 'breaks-dtypes' failed (after remove-noops)" in str(err.value)
    assert "has-spec" in str(err.value)
    # the reproducer holds the graph as it entered the failing pass, and the rest of the pipeline
    assert (tmp_path / "repro" / "pipeline.txt").read_text().strip() == "breaks-dtypes,dce"
    graph = json.loads((tmp_path / "repro" / "graph.json").read_text())
    assert graph["format"] == "lmforge.graph"
    assert not any(n.get("target") == "aten._assert_tensor_metadata.default" for n in graph["nodes"])
    # and it replays: the same failure from the files alone
    ir, pipeline = load_reproducer(tmp_path / "repro")
    assert pipeline == "breaks-dtypes,dce" and ir.param_count() > 0
    with pytest.raises(PassError, match="pass 'breaks-dtypes' failed: .*has-spec"):
        PassManager(pipeline, Instruments(verify_each=True)).run(ir)


def test_print_after_and_dump(fresh_ir, tmp_path):
    printed = []
    inst = Instruments(print_after=frozenset({"dce"}), print_fn=printed.append, dump_dir=tmp_path)
    PassManager("remove-noops,dce", inst).run(fresh_ir())
    assert len(printed) == 1 and printed[0].startswith("// IR after dce\ngraph GPT2LMHeadModel {")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-remove-noops.txt", "01-dce.txt"]
    assert "_assert_tensor_metadata" not in (tmp_path / "00-remove-noops.txt").read_text()


@dataclass(frozen=True)
class _Opts:
    flag: bool = False
    count: int = 1


def test_option_types(temp_passes):
    @temp_passes("typed", options=_Opts)
    def typed(ir, options):
        return PassResult(False)

    (step,) = parse_pipeline("typed{flag=true,count=3}")
    assert step.options == _Opts(True, 3)
    assert str(step) == "typed{flag=true,count=3}"
    with pytest.raises(PassError, match="typed.flag must be true or false"):
        parse_pipeline("typed{flag=maybe}")


@pytest.mark.parametrize("pipeline, late, missing, before", [
    # quantize reads float weights as captured: after convert-dtype it would quantize rounded ones
    ("convert-dtype{dtype=bfloat16},quantize{scheme=int4,group_size=32}", "quantize", "source-dtype", "convert-dtype"),
    # fuse-attention's rules run the op in the cache dtype convert-dtype then gives it
    ("convert-dtype{dtype=bfloat16},fuse-attention", "fuse-attention", "source-dtype", "convert-dtype"),
    # the fusions match the per-position work constant-fold tabulates away
    ("constant-fold,fuse-rmsnorm", "fuse-rmsnorm", "unfolded", "constant-fold"),
    ("quantize{scheme=fp8},quantize{scheme=fp8}", "quantize", "unquantized", "quantize"),
    # shard is last: every rewrite after it would work on one rank's slices
    ("shard{tp=2},constant-fold", "constant-fold", "unsharded", "shard"),
    ("shard{tp=2},remove-noops", "remove-noops", "unsharded", "shard"),
])
def test_ordering_rules_are_enforced(fresh_ir, pipeline, late, missing, before):
    with pytest.raises(PassError) as err:
        PassManager(pipeline).run(fresh_ir())
    assert str(err.value).startswith(f"pass {late!r} requires [{missing!r}], which the passes before it ({before}")


def test_dce_may_follow_shard_and_the_default_pipeline_obeys_the_rules(fresh_ir):
    PassManager("shard{tp=2},dce").run(fresh_ir())
    for dtype in (None, "bfloat16"):
        for quant in (None, QuantizeOptions("int4", group_size=32)):
            steps = default_pipeline(dtype, 32, quant, tp=2)
            missing = pm.check_order(steps)
            assert missing is None, missing


def test_a_pass_preserves_nothing_unless_it_says_so(temp_passes, fresh_ir):
    @temp_passes("silent")
    def silent(ir, options):
        return PassResult(False)

    assert pm.registered_passes()["silent"].preserves == frozenset()
    with pytest.raises(PassError, match=r"'dce' requires \['specs'\].*\(silent\)"):
        PassManager("silent,dce").run(fresh_ir())
    with pytest.raises(ValueError, match="unknown properties"):
        temp_passes("typo", requires=("spec",))(silent)
