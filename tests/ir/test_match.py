"""The rewrite toolkit (`lmforge/ir/match.py`) on small traced graphs: walking a match (`only_user`, `other`,
`strip`, `ancestors`, `mutates`), evaluating a subgraph on probe inputs (`evaluate`), `NoMatch`, and
`replace_match`, which leaves a valid graph computing what the replacement computes."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import fx

from lmforge.ir.graph import GraphIR, KVCacheSpec
from lmforge.ir.spec import spec_from_value
from lmforge.ir.verify import verify
from lmforge.ir.match import NoMatch, ancestors, evaluate, mutates, only_user, other, replace_match, strip

aten = torch.ops.aten
THROUGH = {aten.clone.default, aten._to_copy.default, aten.alias.default}


class _Annotate(fx.Interpreter):
    """Runs the graph once, giving every node the meta["spec"] of its value (as capture does)."""

    def run_node(self, n):
        value = super().run_node(n)
        n.meta["spec"] = spec_from_value(value)
        return value


def _ir(fn, *example, buffers: dict[str, torch.Tensor] | None = None) -> GraphIR:
    """`fn(module, x0, x1, ...)` traced into a subgraph-kind GraphIR whose weights are `buffers`, its specs
    taken from a run on `example`."""
    names = ", ".join(f"x{i}" for i in range(len(example)))  # symbolic_trace names placeholders after these
    scope = {"fn": fn}
    exec(f"def forward(self, {names}):\n    return fn(self, {names})\n", scope)
    root = type("Traced", (torch.nn.Module,), {"forward": scope["forward"]})()
    for name, t in (buffers or {}).items():
        root.register_buffer(name, t)
    gm = fx.symbolic_trace(root)
    _Annotate(gm).run(*example)
    return GraphIR(gm=gm, config={}, kv=KVCacheSpec([], torch.float32), weight_names={}, kind="subgraph")


def _node(ir: GraphIR, target, nth: int = 0) -> fx.Node:
    return [n for n in ir.graph.nodes if n.target is target][nth]


def _snapshot(ir: GraphIR):
    return [(n.name, n.op, n.target, tuple(map(str, n.args)), dict(n.kwargs)) for n in ir.graph.nodes]


X = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
Y = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))


def test_only_user():
    """The one user of a node; None (or NoMatch with the reason, when one is given) for two users or none."""
    ir = _ir(lambda m, x: (aten.neg.default(aten.exp.default(x)), aten.add.Tensor(x, x)), X)
    exp, neg, add = _node(ir, aten.exp.default), _node(ir, aten.neg.default), _node(ir, aten.add.Tensor)
    x = exp.args[0]
    assert only_user(exp) is neg and only_user(exp, "unused reason") is neg
    assert len(x.users) == 2 and only_user(x) is None  # read by exp and by add (once, though twice an argument)
    with pytest.raises(NoMatch, match="^x is read twice$"):
        only_user(x, "x is read twice")
    dead = ir.graph.call_function(aten.sin.default, (x,))
    assert only_user(dead) is None
    with pytest.raises(NoMatch, match="nothing reads it"):
        only_user(dead, "nothing reads it")


def test_other_operand():
    """The operand of a binary op that is not the given one, a node or a constant."""
    ir = _ir(lambda m, x, y: aten.mul.Tensor(aten.add.Tensor(x, y), 2.0), X, Y)
    add, mul = _node(ir, aten.add.Tensor), _node(ir, aten.mul.Tensor)
    x, y = add.args
    assert other(add, x) is y and other(add, y) is x
    assert other(mul, add) == 2.0
    ir = _ir(lambda m, x: aten.mul.Tensor(3.0, x), X)
    mul = _node(ir, aten.mul.Tensor)
    assert other(mul, mul.args[1]) == 3.0


def test_strip_follows_only_the_given_ops():
    """strip walks back through the ops in `through`, collecting them; it stops at any other op, at a cast
    that changes more than the dtype, and at a non-node; a strip with no set collects nothing."""
    def fn(m, x):
        a = aten.alias.default(aten.clone.default(x))
        b = aten._to_copy.default(a, dtype=torch.float64)
        c = aten.clone.default(aten.neg.default(b))
        d = aten._to_copy.default(c, dtype=torch.float32, device=torch.device("cpu"))
        return aten.clone.default(d)

    ir = _ir(fn, X)
    before = _snapshot(ir)
    x = next(n for n in ir.graph.nodes if n.op == "placeholder")
    to_f64 = _node(ir, aten._to_copy.default, 0)
    neg, to_cpu = _node(ir, aten.neg.default), _node(ir, aten._to_copy.default, 1)
    last = _node(ir, aten.clone.default, 2)

    nodes: set = set()
    assert strip(to_f64, THROUGH, nodes) is x
    assert nodes == {to_f64, _node(ir, aten.alias.default), _node(ir, aten.clone.default, 0)}
    nodes = set()
    assert strip(last, THROUGH, nodes) is to_cpu and nodes == {last}  # a device is more than a dtype
    assert strip(_node(ir, aten.clone.default, 1), THROUGH) is neg  # stops at an op not in `through`
    assert strip(to_f64, {aten._to_copy.default}) is _node(ir, aten.alias.default)
    assert strip(x, THROUGH) is x and strip(2.0, THROUGH) == 2.0
    assert _snapshot(ir) == before  # walking changes nothing


def test_ancestors_in_graph_order():
    """A node and everything it depends on (inputs and weights included), in graph order; nothing else."""
    def fn(m, x, y):
        unrelated = aten.exp.default(y)
        a = aten.mul.Tensor(x, m.w)
        b = aten.add.Tensor(a, aten.neg.default(x))
        return b, aten.sin.default(unrelated)

    ir = _ir(fn, X, Y, buffers={"w": torch.ones(5)})
    add = _node(ir, aten.add.Tensor)
    got = ancestors(add)
    names = [n.name for n in got]
    assert names == [n.name for n in ir.graph.nodes if n.name in set(names)]  # graph order
    assert set(names) == {"x0", "w", "mul_tensor", "neg_default", "add_tensor"}
    x = next(n for n in ir.graph.nodes if n.op == "placeholder")
    assert ancestors(x) == [x]


def test_mutates():
    """Only a mutable ATen overload mutates; functional ops and Python callables do not."""
    g = fx.Graph()
    x = g.placeholder("x")
    nodes = [g.call_function(t, (x,)) for t in (aten.index_copy_.default, aten.copy_.default, aten.index_copy.default,
                                                 aten.neg.default, operator.neg)]
    assert [mutates(n) for n in nodes] == [True, True, False, False, False]
    assert not mutates(x)


def test_evaluate_a_subgraph_on_probe_inputs():
    """evaluate computes a node from its ancestors alone, with placeholders bound by name and the graph's
    weights; inputs it does not depend on need no binding; one it does depend on must be given."""
    def fn(m, x, y):
        return aten.add.Tensor(aten.mul.Tensor(x, m.w), 1.0), aten.exp.default(y)

    w = torch.arange(5.0)
    ir = _ir(fn, X, Y, buffers={"w": w})
    add = _node(ir, aten.add.Tensor)
    before = _snapshot(ir)
    probe = torch.randn(2, 5)
    torch.testing.assert_close(evaluate(ir, add, {"x0": probe}), probe * w + 1.0)
    torch.testing.assert_close(evaluate(ir, _node(ir, aten.exp.default), {"x1": probe}), probe.exp())
    with pytest.raises(KeyError):
        evaluate(ir, add, {"x1": probe})
    assert _snapshot(ir) == before


def _softmax_ir():
    """A hand-written softmax whose exp is also an output: the match can erase everything but exp."""
    def fn(m, x):
        shifted = aten.sub.Tensor(x, aten.amax.default(x, [-1], True))
        e = aten.exp.default(shifted)
        p = aten.div.Tensor(e, aten.sum.dim_IntList(e, [-1], True))
        return aten.mul.Tensor(p, m.scale), e

    return _ir(fn, X, buffers={"scale": torch.full((5,), 2.0)})


def _match_softmax(ir: GraphIR):
    """A toy fusion written with the toolkit: (out, x, nodes) of div(e, sum(e)) with e = exp(x - amax(x)),
    or NoMatch. The exp may have other users (it is then kept); the sum must feed only the division."""
    div = _node(ir, aten.div.Tensor)
    e, total = div.args
    nodes = {div, e, total}
    if total.target is not aten.sum.dim_IntList or total.args[0] is not e:
        raise NoMatch("the divisor is not the sum of the numerator")
    only_user(total, "the sum is used for more than the division")
    sub = strip(e.args[0], THROUGH, nodes)
    amax = sub.args[1]
    x = other(sub, amax)
    if amax.target is not aten.amax.default or amax.args[0] is not x:
        raise NoMatch("not shifted by the max")
    nodes |= {sub, amax}  # the exp's op is left to the probe
    probe = torch.randn(4, 5)
    if not torch.allclose(evaluate(ir, div, {"x0": probe}), torch.softmax(probe, -1)):
        raise NoMatch("not a softmax on the probe")
    return div, x, nodes


def test_replace_match_leaves_a_valid_graph_computing_the_replacement():
    """The match's output is replaced by the new node (taking its spec); the matched nodes nothing reads any
    more are erased, the ones still read (exp, an output) kept; the graph verifies and computes softmax."""
    ir = _softmax_ir()
    out, x, nodes = _match_softmax(ir)
    spec = out.meta["spec"]
    new = replace_match(ir, out, aten._softmax.default, (x, -1, False), nodes)
    ir.gm.recompile()
    verify(ir, where="after the test's rewrite")
    assert new.meta["spec"] == spec and new.args == (x, -1, False)
    targets = [n.target for n in ir.graph.nodes if n.op == "call_function"]
    assert targets == [aten.amax.default, aten.sub.Tensor, aten.exp.default, aten._softmax.default, aten.mul.Tensor]
    assert all(n.graph is ir.graph for n in ir.graph.nodes) and out not in set(ir.graph.nodes)
    scaled, e = ir.gm(X)
    torch.testing.assert_close(scaled, 2.0 * torch.softmax(X, -1))
    torch.testing.assert_close(e, (X - X.amax(-1, keepdim=True)).exp())


def test_replace_match_erases_the_whole_chain_when_nothing_else_reads_it():
    """With the exp read by nothing outside the match, every matched node goes, users first."""
    ir = _softmax_ir()
    output = next(n for n in ir.graph.nodes if n.op == "output")
    output.args = (output.args[0][:1],)  # drop the exp output
    ir.gm.recompile()
    out, x, nodes = _match_softmax(ir)
    replace_match(ir, out, aten._softmax.default, (x, -1, False), nodes)
    ir.gm.recompile()
    verify(ir)
    assert [n.target for n in ir.graph.nodes if n.op == "call_function"] == [aten._softmax.default, aten.mul.Tensor]
    torch.testing.assert_close(ir.gm(X)[0], 2.0 * torch.softmax(X, -1))


def test_a_failed_match_changes_nothing():
    """NoMatch raised part-way through (the sum has a second user; the probe disagrees) leaves the graph as it
    was: the walking and evaluating helpers never edit it."""
    ir = _softmax_ir()
    total = _node(ir, aten.sum.dim_IntList)
    output = next(n for n in ir.graph.nodes if n.op == "output")
    output.args = ((*output.args[0], total),)  # the sum is also an output now
    ir.gm.recompile()
    before, code = _snapshot(ir), ir.gm.code
    with pytest.raises(NoMatch, match="the sum is used for more than the division"):
        _match_softmax(ir)
    assert _snapshot(ir) == before and ir.gm.code == code

    ir = _softmax_ir()
    _node(ir, aten.exp.default).target = aten.sigmoid.default  # what the walk does not look at: the values
    ir.gm.recompile()
    before = _snapshot(ir)
    with pytest.raises(NoMatch, match="not a softmax on the probe"):
        _match_softmax(ir)
    assert _snapshot(ir) == before
