"""fuse-attention: every attention over the KV cache becomes one `lmforge::attention` op.

The rewrite, in three steps (nothing changes until all three succeed for an attention):

1. Canonicalize the core. Both forms Hugging Face emits reduce to one description, `Core(q, k, v, scale,
   masks)`: `scaled_dot_product_attention(q, k, v, mask, scale)` (the "sdpa" implementation), and the
   "eager" chain `softmax(QK^T * scale (+ mask | where(mask, ., -big))) @ V`, with the scale a mul or div
   by a constant before or after the matmul (GPT-2 divides by `full([], sqrt(d))`), the softmax in float32
   or not, and clones, dropout and casts anywhere on the way (`PASS_THROUGH`).
2. Match the cache side. K and V must be the cache writes `index_copy_(k_cache_i, 2, slots, k_new)`,
   directly or through a `repeat_kv` (unsqueeze -> expand -> clone -> view) whose group size is Hq/Hkv:
   the fused op reads the unrepeated cache by head index.
3. Check the mask by meaning, not by shape: the mask's subgraph is evaluated on probe inputs (random
   padding, prefill and decode shapes) and must equal the op's own rule, `attention_mask[b, j] and
   j <= slot and slot - j < window`, exactly; the window is read off a probe one query long with 2^20 slots.

Then the core and both cache writes are replaced by `lmforge.attention(q, k_new, v_new, k_cache_i,
v_cache_i, attention_mask, scale, causal, window)`; the masks' subgraphs die in the following `dce`.

An attention that does not match is left as it was, and the reason is counted in the stats
(`unfused: softcapping (tanh on the scores) is not supported`), which `lmforge inspect` shows.

Why: the fused op never materializes repeated K/V or the (seq x kv_len) scores, writes the cache and
attends in one call, and picks a FlashAttention kernel on the GPU. Where: after `remove-noops` and `dce`
(fewer pass-through nodes), before `convert-dtype` (whose rules run the op in the cache dtype) and before
`constant-fold`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx

from lmforge.codegen.attention import visible_mask
from lmforge.ir.graph import GraphIR, position_ids
from lmforge.ir.spec import TensorSpec
from lmforge.ir.pass_manager import PROPERTIES, PassResult, register_pass
from lmforge.ir.match import NoMatch, ancestors, evaluate, mutates, only_user, replace_match, strip

aten = torch.ops.aten

# ops that hand their input on unchanged in inference, as far as attention is concerned
PASS_THROUGH = {aten.clone.default, aten.alias.default, aten.dropout.default, aten._to_copy.default}
MATMULS = {aten.matmul.default, aten.bmm.default}
SOFTMAX = {aten.softmax.int, aten._softmax.default}
# scaling ops -> whether they divide by their constant
SCALE_OPS = {aten.mul.Tensor: False, aten.mul.Scalar: False, aten.div.Tensor: True, aten.div.Scalar: True}
VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
PROBE_LONG = 1 << 20  # the slots of the window probe: capture's largest kv_len
BLOCKED = -1e4  # an additive mask value at or below this hides a key (HF uses the dtype's min)


@dataclass
class Core:
    """One attention, whatever form it took: out = softmax(q k^T * scale, masked) v."""

    out: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float | None  # None: 1/sqrt(head_dim)
    masks: list[tuple[str, fx.Node]] = field(default_factory=list)  # (kind, node): "visible" | "blocked" | "additive"
    nodes: set[fx.Node] = field(default_factory=set)  # the core's own nodes, erased by the rewrite
    gqa: bool = False  # sdpa's enable_gqa: k/v have fewer heads than q


def _constant(ir: GraphIR, arg) -> float | None:
    """The value of a scalar computed from constants alone (a literal, `full([], c)`, a folded weight)."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg)
    if not isinstance(arg, fx.Node):
        return None
    if any(n.op == "placeholder" or mutates(n) for n in ancestors(arg)):
        return None
    value = evaluate(ir, arg, {})
    return float(value) if isinstance(value, torch.Tensor) and value.numel() == 1 else None


# --- step 1: the core ---------------------------------------------------------------------------------


def _sdpa_core(node: fx.Node) -> Core:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    if args.get("is_causal"):
        raise NoMatch("sdpa with is_causal=True and no mask (top-left causal) does not follow the cache convention")
    core = Core(node, args["query"], args["key"], args["value"], args.get("scale"), nodes={node},
                gqa=bool(args.get("enable_gqa")))
    mask = args.get("attn_mask")
    if isinstance(mask, fx.Node):
        kind = "visible" if mask.meta["spec"].dtype == torch.bool else "additive"
        core.masks.append((kind, mask))
    return core


def _scale_factor(ir: GraphIR, node: fx.Node) -> tuple[fx.Node, float] | None:
    """`x * c` or `x / c` with c constant -> (x, factor), else None."""
    if node.op != "call_function" or node.target not in SCALE_OPS:
        return None
    divides = SCALE_OPS[node.target]
    for tensor_i, const_i in ((0, 1), (1, 0)) if not divides else ((0, 1),):
        c = _constant(ir, node.args[const_i])
        if c is not None and isinstance(node.args[tensor_i], fx.Node) and c != 0:
            return node.args[tensor_i], (1.0 / c if divides else c)
    return None


def _reaches_matmul(node, steps: int = 12) -> bool:
    for _ in range(steps):
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return False
        if node.target in MATMULS:
            return True
        node = next((a for a in node.args if isinstance(a, fx.Node)), None)
    return False


def _eager_core(ir: GraphIR, softmax: fx.Node) -> Core:
    nodes: set[fx.Node] = {softmax}
    if softmax.args[1] not in (-1, len(softmax.meta["spec"].shape) - 1):
        raise NoMatch("softmax over a dimension other than the keys")
    # forward: softmax -> pass-through -> matmul(p, V)
    user, out = only_user(softmax), None
    while user is not None:
        if user.target in PASS_THROUGH:
            nodes.add(user)
            user = only_user(user)
        elif user.target in MATMULS and strip(user.args[0], PASS_THROUGH) is softmax:
            out = user
            break
        else:
            break
    if out is None:
        raise NoMatch("the attention probabilities are used for more than P @ V (e.g. output_attentions)")
    nodes.add(out)
    # backward: softmax input -> masks and scales -> matmul(q, k^T)
    scale, masks = 1.0, []
    x = strip(softmax.args[0], PASS_THROUGH, nodes)
    while not (x.op == "call_function" and x.target in MATMULS):
        if x.op != "call_function":
            raise NoMatch(f"scores come from {x.op} {x.name}")
        scaled = _scale_factor(ir, x)
        if scaled is not None:
            nodes.add(x)
            x, factor = scaled
            scale *= factor
        elif x.target is aten.add.Tensor:
            score_i = 0 if _reaches_matmul(x.args[0]) else 1
            masks.append(("additive", x.args[1 - score_i]))
            nodes.add(x)
            x = x.args[score_i]
        elif x.target in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf):
            cond, a, b = x.args
            for score, fill, kind in ((a, b, "visible"), (b, a, "blocked")):
                fill_value = _constant(ir, fill)
                if _reaches_matmul(score) and fill_value is not None and fill_value <= BLOCKED:
                    masks.append((kind, cond))
                    break
            else:
                raise NoMatch("a where() on the scores that does not fill with a large negative value")
            nodes.add(x)
            x = score
        elif x.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            fill_value = _constant(ir, x.args[2])
            if fill_value is None or fill_value > BLOCKED:
                raise NoMatch("a masked_fill() on the scores that does not fill with a large negative value")
            masks.append(("blocked", x.args[1]))
            nodes.add(x)
            x = x.args[0]
        elif x.target is aten.tanh.default:
            raise NoMatch("softcapping (tanh on the scores) is not supported")
        else:
            raise NoMatch(f"{x.target} between QK^T and the softmax is not supported")
        x = strip(x, PASS_THROUGH, nodes)
    qk = x
    nodes.add(qk)
    q = strip(qk.args[0], PASS_THROUGH, nodes)
    scaled = _scale_factor(ir, q)
    if scaled is not None and len(q.users) == 1:  # q pre-scaled
        nodes.add(q)
        q, factor = scaled
        scale *= factor
    kt = strip(qk.args[1], PASS_THROUGH, nodes)
    rank = len(kt.meta["spec"].shape)
    if kt.target is aten.transpose.int and {a % rank for a in kt.args[1:]} == {rank - 1, rank - 2}:
        nodes.add(kt)
        k = kt.args[0]
    elif kt.target is aten.permute.default and list(kt.args[1]) == [0, 1, 3, 2]:
        nodes.add(kt)
        k = kt.args[0]
    else:
        raise NoMatch("the keys reach QK^T through something other than a transpose")
    return Core(out, q, k, out.args[1], scale, masks, nodes)


# --- step 2: the cache side ---------------------------------------------------------------------------


def _unrepeat(node: fx.Node, nodes: set[fx.Node]) -> tuple[fx.Node, int]:
    """`repeat_kv(x, G)` (unsqueeze(2) -> expand G -> [clone] -> view) -> (x, G); anything else -> (node, 1)."""
    view = strip(node, PASS_THROUGH)
    if view.op != "call_function" or view.target not in VIEWS:
        return node, 1
    expand = strip(view.args[0], PASS_THROUGH)
    if expand.op != "call_function" or expand.target is not aten.expand.default:
        return node, 1
    unsq = expand.args[0]
    if unsq.op != "call_function" or unsq.target is not aten.unsqueeze.default or unsq.args[1] != 2:
        return node, 1
    group = expand.meta["spec"].shape[2]
    if not isinstance(group, int):
        raise NoMatch("repeat_kv with a symbolic group size")
    chain = {view, expand, unsq}
    n = node
    while n is not view:  # the pass-through ops between
        chain.add(n)
        n = n.args[0]
    n = view.args[0]
    while n is not expand:
        chain.add(n)
        n = n.args[0]
    nodes |= chain
    return unsq.args[0], group


def _cache_write(node: fx.Node, which: str) -> fx.Node:
    write = strip(node, PASS_THROUGH)
    if not (write.op == "call_function" and write.target is aten.index_copy_.default):
        raise NoMatch(f"the {which} do not come from the KV cache")
    cache, dim, slots, _ = write.args
    if not (cache.op == "placeholder" and cache.name.startswith(f"{which[0]}_cache_") and dim == 2):
        raise NoMatch(f"the {which} are written somewhere other than a cache input")
    if not (slots.op == "call_function" and slots.target is aten.arange.start):
        raise NoMatch("the cache write does not go to the last seq slots")
    readers = [u for u in cache.users if u is not write and u.target is not aten.sym_size.int]
    if readers:
        raise NoMatch(f"the cache input %{cache.name} is also read by %{readers[0].name}")
    return write


# --- step 3: the mask, by evaluation ------------------------------------------------------------------


class MaskProbe:
    """Evaluates mask subgraphs on probe inputs; remembers what each mask turned out to be."""

    def __init__(self, ir: GraphIR, seed: int = 0):
        self.ir = ir
        self.gen = torch.Generator().manual_seed(seed)
        self.known: dict[tuple, tuple[bool, int]] = {}

    def inputs(self, attention_mask: torch.Tensor, seq: int) -> dict[str, torch.Tensor]:
        batch, kv_len = attention_mask.shape
        feed = {"input_ids": torch.zeros(batch, seq, dtype=torch.long),
                "position_ids": position_ids(attention_mask)[:, kv_len - seq:],
                "attention_mask": attention_mask}
        zero = torch.zeros((), dtype=self.ir.kv.dtype)
        for i, layer in enumerate(self.ir.kv.layers):  # only their sizes are read: no memory behind them
            feed[f"k_cache_{i}"] = zero.expand(batch, layer.n_kv_heads, kv_len, layer.k_head_dim)
            feed[f"v_cache_{i}"] = zero.expand(batch, layer.n_kv_heads, kv_len, layer.v_head_dim)
        return feed

    def visible(self, masks: list[tuple[str, fx.Node]], attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
        """(B, 1, S, L) bool: the slots the graph's masks leave visible for these inputs."""
        feed = self.inputs(attention_mask, seq)
        batch, kv_len = attention_mask.shape
        result = torch.ones(batch, 1, seq, kv_len, dtype=torch.bool)
        for kind, node in masks:
            value = evaluate(self.ir, node, feed)
            if kind == "additive":
                hidden = value <= BLOCKED
                if not bool((hidden | (value == 0)).all()):
                    raise NoMatch("an additive attention bias (not only 0 / -inf) is not supported")
                value = ~hidden
            elif kind == "blocked":
                value = ~value.bool()
            value = value.bool()
            if value.dim() != 4 or value.shape[-2:] != (seq, kv_len):
                raise NoMatch(f"a mask of shape {tuple(value.shape)}")
            if value.shape[1] != 1:
                if not bool((value == value[:, :1]).all()):
                    raise NoMatch("a mask that differs between heads")
                value = value[:, :1]
            result = result & value
        return result

    def semantics(self, masks: list[tuple[str, fx.Node]]) -> tuple[bool, int]:
        """(causal, window) such that the masks equal the op's rule on every probe, or NoMatch."""
        key = tuple((kind, node) for kind, node in masks)
        if key not in self.known:
            self.known[key] = self._semantics(masks)
        return self.known[key]

    def _semantics(self, masks) -> tuple[bool, int]:
        if not masks:
            raise NoMatch("attention without a mask cannot follow the cache's padding and causality")
        if any(mutates(n) for _, node in masks for n in ancestors(node)):
            raise NoMatch("the mask depends on the cache contents")
        try:
            row = self.visible(masks, torch.ones(1, PROBE_LONG, dtype=torch.long), 1)[0, 0, 0]
        except NoMatch:
            raise
        except Exception as e:
            raise NoMatch(f"the mask cannot be evaluated on probe inputs ({str(e).splitlines()[0][:80]})") from None
        seen = int(row.sum())
        if not bool(row[PROBE_LONG - seen:].all()):
            raise NoMatch("the mask is not causal, sliding-window and padding (e.g. chunked or custom)")
        window = 0 if seen == PROBE_LONG else seen
        for causal in (True, False):
            if not causal and window:
                break
            if all(self._agrees(masks, causal, window, *shape) for shape in self._shapes(window)):
                return causal, window
        raise NoMatch("the mask is not causal, sliding-window and padding (e.g. chunked or custom)")

    def _shapes(self, window: int):
        shapes = [(2, 5, 5), (3, 1, 9), (2, 4, 13), (1, 7, 7), (2, 1, 1)]
        if window:
            shapes += [(2, 3, window + 6), (2, 1, window + 2), (1, window + 3, window + 3)][: 3 if window < 512 else 2]
        return shapes

    def _agrees(self, masks, causal: bool, window: int, batch: int, seq: int, kv_len: int) -> bool:
        attention_mask = (torch.rand(batch, kv_len, generator=self.gen) < 0.8).long()
        attention_mask[:, -seq:] = 1  # the new tokens are real...
        attention_mask[0, : kv_len // 3] = 0  # ...after some left padding in row 0
        got = self.visible(masks, attention_mask, seq)
        want = visible_mask(attention_mask, seq, causal, window)
        return bool((got == want).all())


# --- the pass -----------------------------------------------------------------------------------------


@dataclass
class Match:
    core: Core
    k_write: fx.Node
    v_write: fx.Node
    causal: bool
    window: int
    nodes: set[fx.Node]


def _match(core: Core, probe: MaskProbe) -> Match:
    nodes = set(core.nodes)
    k_src, k_group = _unrepeat(core.k, nodes)
    v_src, v_group = _unrepeat(core.v, nodes)
    k_write, v_write = _cache_write(k_src, "keys"), _cache_write(v_src, "values")
    nodes |= {k_write, v_write}
    q_spec, k_spec = core.q.meta["spec"], k_write.meta["spec"]
    if not (isinstance(q_spec, TensorSpec) and len(q_spec.shape) == 4 and isinstance(q_spec.shape[1], int)):
        raise NoMatch(f"queries of shape {q_spec}")
    heads, kv_heads = q_spec.shape[1], k_spec.shape[1]
    # sdpa's enable_gqa and broadcasting over one kv head (multi-query attention) both mean grouping
    group = heads // kv_heads if core.gqa or (kv_heads == 1 and k_group == 1) else k_group
    if k_group != v_group or heads != kv_heads * group:
        raise NoMatch(f"{heads} query heads over {kv_heads} kv heads repeated {k_group}x/{v_group}x")
    for write in (k_write, v_write):  # every reader of the cache write must be part of this attention
        outside = [u for u in write.users if u not in nodes]
        if outside:
            raise NoMatch(f"the cache read %{write.name} is also used by %{outside[0].name}")
    causal, window = probe.semantics(core.masks)
    return Match(core, k_write, v_write, causal, window, nodes)


def _rewrite(ir: GraphIR, m: Match) -> None:
    from lmforge.codegen.attention import attention

    graph = ir.graph
    core = m.core
    scale = core.scale if core.scale is not None else 1.0 / math.sqrt(core.q.meta["spec"].shape[-1])
    mask_input = next(n for n in graph.nodes if n.op == "placeholder" and n.name == "attention_mask")
    replace_match(ir, core.out, attention, (core.q, m.k_write.args[3], m.v_write.args[3], m.k_write.args[0],
                                            m.v_write.args[0], mask_input, float(scale), m.causal, m.window), m.nodes)


def find_cores(ir: GraphIR) -> list[tuple[fx.Node, Core | NoMatch]]:
    """Every attention in the graph (an sdpa or a softmax over scores), as a Core or why it is not one."""
    found = []
    for node in ir.graph.nodes:
        if node.op != "call_function":
            continue
        try:
            if node.target is aten.scaled_dot_product_attention.default:
                found.append((node, _sdpa_core(node)))
            elif node.target in SOFTMAX:
                found.append((node, _eager_core(ir, node)))
        except NoMatch as e:
            found.append((node, e))
    return found


@register_pass("fuse-attention", requires=("specs", "cache-in-place", "source-dtype", "unfolded", "unsharded"),
               preserves=PROPERTIES)
def fuse_attention(ir: GraphIR, options) -> PassResult:
    probe = MaskProbe(ir)
    stats: dict[str, int] = {"attentions": 0, "fused": 0}
    matches: list[Match] = []
    for _, core in find_cores(ir):
        stats["attentions"] += 1
        try:
            if isinstance(core, NoMatch):
                raise core
            matches.append(_match(core, probe))
        except NoMatch as e:
            key = f"unfused: {e}"
            stats[key] = stats.get(key, 0) + 1
    for m in matches:
        _rewrite(ir, m)
        stats["fused"] += 1
    return PassResult(bool(matches), stats)
