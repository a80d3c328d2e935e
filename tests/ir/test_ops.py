"""The op registry (`lmforge/ir/ops.py`): every lmforge op declares its facts once, and every tool reads them.

The ops below are added in this file alone (schema, reference, fake and `OpFacts`), which is all adding an op
takes: the verifier, the cost model, convert-dtype, the shard pass and the CPU binding then know them.
"""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import PassError
from lmforge.ir.analysis import cost
from lmforge.ir.capture import capture
from lmforge.ir.linear import find_linears
from lmforge.ir.ops import Casts, OpFacts, register_op, registered_ops
from lmforge.ir.spec import TensorSpec
from lmforge.ir.verify import VerifyError, verify
from lmforge.passes import PassManager
from lmforge.passes.shard import plan
from lmforge.runtime.bind import bind_cpu_kernels
from tests.conftest import make_model

_lib = torch.library.Library("lmforge", "FRAGMENT")
for _name in ("test_scale", "test_scale_whole", "test_scale_undeclared"):
    _lib.define(f"{_name}(Tensor x, Tensor s) -> Tensor")
    _lib.impl(_name, lambda x, s: x * s, "CPU")
    torch.library.register_fake(f"lmforge::{_name}")(lambda x, s: torch.empty_like(x))


def _scale_cpu(x, s):
    return x * s


def _positive(node) -> str | None:
    return None if float(node.args[1].meta.get("value", 1.0)) > 0 else "the scale is not positive"


scale = torch.ops.lmforge.test_scale.default
register_op(scale, OpFacts(
    shard="elementwise", verify=("positive-scale", _positive), cpu=_scale_cpu,
    cost=lambda node: (7, 0),  # a made-up count, to see the cost model add it
    casts=Casts((1,), to=0, why="cast-scale"),  # the scale in x's dtype
))
register_op(torch.ops.lmforge.test_scale_whole.default, OpFacts(shard="replicated"))


def test_every_lmforge_op_declares_its_facts():
    import lmforge.codegen  # noqa: F401

    defined = {name.split("::")[1].split(".")[0] for name in torch._C._dispatch_get_all_op_names()
               if name.startswith("lmforge::")}
    declared = {str(op).split(".")[1] for op in registered_ops()}
    assert {"attention", "linear", "rms_norm", "rotary", "int4_linear", "fp8_linear", "all_reduce",
            "all_gather"} <= declared
    assert defined - declared == {"test_scale_undeclared"}


def test_registration_is_checked():
    with pytest.raises(ValueError, match="registered twice"):
        register_op(scale, OpFacts(shard="elementwise"))
    with pytest.raises(ValueError, match="shard must be one of"):
        register_op(torch.ops.lmforge.test_scale_undeclared.default, OpFacts(shard="maybe"))


def _with_op(target, value: float = 2.0):
    """A tiny Llama whose q projection output goes through `target(q, s)` with a float32 scalar buffer s."""
    ir = capture(make_model("llama"))
    q_proj = next(lin.node for lin in find_linears(ir.graph)
                  if ir.weight_names[lin.weight.target].endswith("q_proj.weight"))
    ir.set_weight("test_s", torch.tensor(value), source_name="test.s", kind="buffer")
    users = list(q_proj.users)
    with ir.graph.inserting_after(q_proj):
        s = ir.graph.get_attr("test_s")
    s.meta["spec"], s.meta["value"] = TensorSpec((), torch.float32), value
    with ir.graph.inserting_after(s):
        new = ir.graph.call_function(target, (q_proj, s))
    new.meta["spec"] = q_proj.meta["spec"]
    for u in users:
        u.replace_input_with(q_proj, new)
    ir.gm.recompile()
    PassManager("remove-noops,dce,fuse-attention").run(ir)  # as every pipeline starts
    return ir, new


def test_the_tools_read_a_new_ops_facts():
    ir, node = _with_op(scale)
    verify(ir)  # known, and its rule holds
    base, _ = _with_op(torch.ops.lmforge.test_scale_whole.default)
    assert cost(ir).matmul_flops_per_token == cost(base).matmul_flops_per_token + 7

    PassManager("convert-dtype{dtype=bfloat16}").run(ir)  # Casts: the float32 scale follows x into bfloat16
    assert node.args[1].target is torch.ops.aten._to_copy.default and node.args[1].meta["spec"].dtype == torch.bfloat16
    assert any(h["stats"].get("cast-scale") for h in ir.history)

    assert bind_cpu_kernels(ir, torch.device("cpu")) >= 1 and node.target is _scale_cpu
    verify(ir)  # a bound node keeps its op's rules


def test_the_shard_pass_follows_the_declared_kind():
    ir, _ = _with_op(scale)  # "elementwise": the q projection still shards
    assert not [r for r in plan(ir, 2).replicated if r.layer.endswith("layers.0.self_attn.q_proj")]
    whole, _ = _with_op(torch.ops.lmforge.test_scale_whole.default)  # "replicated": it stays whole, with why
    (kept,) = [r for r in plan(whole, 2).replicated if r.layer.endswith("layers.0.self_attn.q_proj")]
    assert "test_scale_whole" in kept.why


def test_an_op_rule_that_breaks_names_the_rule():
    with pytest.raises(VerifyError, match=r"breaks 'positive-scale': the scale is not positive"):
        _with_op(scale, value=-1.0)  # the pass manager verifies before its first pass


def test_an_undeclared_op_is_rejected():
    """Forgetting the facts is never silent: the verifier refuses the graph before any pass relies on them."""
    with pytest.raises(PassError, match=r"breaks 'known-op': an lmforge op without OpFacts"):
        _with_op(torch.ops.lmforge.test_scale_undeclared.default)
