"""An artifact's graph rewritten to onnxruntime-genai's calling convention, ready for `torch.onnx.export`.

lmforge's graph takes caches that already have room for the new tokens and writes them in place
(`lmforge.attention`); ONNX Runtime's GroupQueryAttention takes the past cache and returns the present one.
`prepare(ir)` rewrites a loaded artifact graph, in place:

- each `k_cache_i`/`v_cache_i` input becomes the past (B, Hkv, past, D), each attention `lmforge_export.gqa`
  with its present keys/values as graph outputs, after the logits: (logits, present.0.key, present.0.value, ...);
  it reads and writes (B, S, heads * D) rows, so the views and transposes around attention (and its rotaries)
  fall away;
- the inputs in genai's order: input_ids, attention_mask, position_ids, then the pasts;
- each rotary on rows of a rotate-half cos/sin table gathered by position becomes `lmforge_export.
  rotary_embedding` (RotaryEmbedding over half-width tables, the positions from `position_ids`);
- every floating weight, cast and op dtype becomes float32 (a bfloat16 or float16 artifact's weights widen
  exactly): ONNX Runtime's CPU kernels for these ops are float32 ones;
- int4 and int8 linears become `lmforge_export.matmul_nbits` over MatMulNBits' blocked layout (int4: block =
  the group, zero points packed when they are integers, float otherwise; int8: per-channel scales repeated
  per block of 128, zero point 128): the quantized numbers are carried, never re-quantized.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from lmforge.export import onnx_ops
from lmforge.export.formats import require
from lmforge.ir.graph import GraphIR
from lmforge.ir.spec import spec_of
from lmforge.quant import int4

lmforge = torch.ops.lmforge
aten = torch.ops.aten
INT8_BLOCK = 128
_HALVES = (torch.bfloat16, torch.float16)


def input_names(layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def output_names(layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def prepare(ir: GraphIR, accuracy_level: int = 0) -> int:
    """Rewrite `ir` for export (see the module docstring), its MatMulNBits at `accuracy_level` (0: float
    activations, 4: int8 ones); returns its number of attention layers."""
    g = ir.graph
    inputs = {n.name: n for n in g.nodes if n.op == "placeholder"}
    layers = len(ir.kv.layers)
    caches = [inputs.get(f"{kv}_cache_{i}") for i in range(layers) for kv in ("k", "v")]
    require(all(c is not None for c in caches) and {"input_ids", "position_ids", "attention_mask"} <= set(inputs),
            "--format onnx needs a whole language model graph (input_ids, position_ids, attention_mask, caches)")
    _order_inputs(g, [inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"], *caches])
    presents: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
    tables: dict[str, fx.Node] = {}  # position table -> its half-width cache, shared by the layers
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        if node.target is lmforge.attention.default:
            cache = node.args[3]
            presents[cache] = _to_gqa(g, node)
        elif node.target is lmforge.rotary.default:
            _to_rotary_embedding(ir, node, inputs["position_ids"], tables)
        elif node.target is lmforge.int4_linear.default:
            _to_nbits(ir, node, accuracy_level, *_int4_blocks(ir, node))
        elif node.target is lmforge.int8_linear.default:
            _to_nbits(ir, node, accuracy_level, *_int8_blocks(ir, node))
        elif node.target is lmforge.fp8_linear.default:
            require(False, "--format onnx does not carry fp8 layers (ONNX Runtime's CPU has no fp8 matmul); "
                           "optimize with --quant int4 or int8, or export fp8 with --format hf")
    for cache in caches:
        _past_uses(g, cache, inputs["attention_mask"])
    _widen(ir)
    out = next(n for n in g.nodes if n.op == "output")
    logits = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    outputs = [logits]
    for i in range(0, len(caches), 2):
        k_present, v_present = presents[caches[i]]
        outputs += [k_present, v_present]
    out.args = (tuple(outputs),)
    g.eliminate_dead_code()
    ir.prune_weights()
    g.lint()
    ir.gm.recompile()
    return layers


def example_inputs(ir: GraphIR, batch: int = 2, seq: int = 3, past: int = 4) -> list[torch.Tensor]:
    """Inputs for tracing: sizes above 1 and all different, so that none is specialized to a constant."""
    total = past + seq
    vocab = int(ir.config.get("vocab_size", 32))
    args = [torch.randint(0, vocab, (batch, seq)), torch.ones(batch, total, dtype=torch.long),
            torch.arange(past, total).expand(batch, seq).contiguous()]
    for layer in ir.kv.layers:
        args.append(torch.randn(batch, layer.n_kv_heads, past, layer.k_head_dim))
        args.append(torch.randn(batch, layer.n_kv_heads, past, layer.v_head_dim))
    return args


def dynamic_shapes(layers: int) -> list[dict[int, object]]:
    dim = torch.export.Dim
    batch, seq, total, past = (dim("batch_size"), dim("sequence_length"), dim("total_sequence_length"),
                               dim("past_sequence_length"))
    return [{0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}] + [{0: batch, 2: past}] * (2 * layers)


def _order_inputs(g: fx.Graph, order: list[fx.Node]) -> None:
    for node in reversed(order):
        head = next(iter(g.nodes))
        if head is not node:
            head.prepend(node)


def _to_gqa(g: fx.Graph, node: fx.Node) -> tuple[fx.Node, fx.Node]:
    """attention(q, k, v (B, H, S, D), caches, ...) -> gqa on the (B, S, H * D) rows they were made from."""
    q, k, v, k_cache, v_cache, mask, scale, *rest = node.args
    causal = rest[0] if rest else node.kwargs.get("causal", True)
    window = rest[1] if len(rest) > 1 else node.kwargs.get("window", 0)
    require(causal, "--format onnx carries causal attention only (GroupQueryAttention)")
    heads, v_dim = _dims(q)[1], _dims(v)[3]
    with g.inserting_before(node):
        rows = [_token_major(g, arg) for arg in (q, k, v)]
        fused = g.call_function(onnx_ops.gqa, (*rows, k_cache, v_cache, mask, scale, window))
        out = g.call_function(operator.getitem, (fused, 0))
        present = (g.call_function(operator.getitem, (fused, 1)), g.call_function(operator.getitem, (fused, 2)))
    for user in list(node.users):  # the usual transpose(1, 2) then view (B, S, H * Dv): that is `out` already
        if user.target is aten.transpose.int and user.args[1:] == (1, 2) and _flattened(user):
            for u in list(user.users):  # a view (or a copy, whose views then view `out`)
                u.replace_all_uses_with(out)
                g.erase_node(u)
            g.erase_node(user)
    if node.users:
        with g.inserting_after(out):
            split = g.call_function(aten.unflatten.int, (out, 2, [heads, v_dim]))
        with g.inserting_after(split):
            heads_major = g.call_function(aten.transpose.int, (split, 1, 2))
        node.replace_all_uses_with(heads_major)
    g.erase_node(node)
    return present


def _flattened(node: fx.Node) -> bool:
    """Is every use of `node` (B, S, H, D) a view or reshape to (B, S, H * D), or a contiguous copy that is?"""
    def rows(u: fx.Node) -> bool:
        if u.target is aten.clone.default:
            return _flattened(u)
        return u.target in (aten.view.default, aten.reshape.default) and len(u.args[1]) == 3 and (
            u.args[1][2] in (-1, _dims(node)[2] * _dims(node)[3]))
    return bool(node.users) and all(rows(u) for u in node.users)


def _token_major(g: fx.Graph, arg: fx.Node) -> fx.Node:
    """(B, S, H * D) rows of a (B, H, S, D) value: the projection it was viewed from, where it is
    transpose(view(rows, (B, S, H, D)), 1, 2), possibly under a rotary (which takes either layout); else the
    value transposed and flattened."""
    rotary = arg.target is onnx_ops.rotary_embedding
    inner = arg.args[0] if rotary else arg
    if (inner.target is aten.transpose.int and inner.args[1:] == (1, 2)
            and inner.args[0].target in (aten.view.default, aten.reshape.default)
            and len(_dims(inner.args[0].args[0])) == 3):
        rows = inner.args[0].args[0]
        if not rotary:
            return rows
        return g.call_function(onnx_ops.rotary_embedding, (rows, *arg.args[1:]))
    return g.call_function(aten.flatten.using_ints, (g.call_function(aten.transpose.int, (arg, 1, 2)), 2))


def _position_table(arg, position_ids: fx.Node) -> str | None:
    """The weight whose rows `arg` gathers by position (through unsqueezes and dtype casts), or None."""
    node = arg
    while isinstance(node, fx.Node) and (node.target is aten.unsqueeze.default
                                         or node.target is aten._to_copy.default and set(node.kwargs) <= {"dtype"}):
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.target is aten.index.Tensor and node.args[1] == [position_ids]):
        return None
    table = node.args[0]
    return table.target if isinstance(table, fx.Node) and table.op == "get_attr" else None


def _dims(arg) -> tuple:
    spec = spec_of(arg)
    return tuple(spec.shape) if spec is not None else ()


def _to_rotary_embedding(ir: GraphIR, node: fx.Node, position_ids: fx.Node, tables: dict[str, fx.Node]) -> None:
    """rotary(x (B, H, S, D), cos[pos], sin[pos] (B, 1, S, D)) over rotate-half tables (the two halves of each
    row equal) -> RotaryEmbedding on half-width caches; anything else keeps the rotate-half formula."""
    x, cos, sin = node.args
    names = [_position_table(arg, position_ids) for arg in (cos, sin)]
    x_dims, cos_dims = _dims(x), _dims(cos)
    if None in names or len(x_dims) != 4 or len(cos_dims) != 4 or cos_dims[1] != 1 or _dims(sin) != cos_dims:
        return
    halves = []
    for name in names:
        table = ir.weight(name).float()
        half = table.shape[1] // 2
        if table.shape[1] != x_dims[3] or not torch.equal(table[:, :half], table[:, half:]):
            return
        if name not in tables:  # one cache per table, made before its first use
            tables[name] = _weight_node(ir, node, f"{name}_half", table[:, :half].contiguous())
        halves.append(tables[name])
    with ir.graph.inserting_before(node):
        new = ir.graph.call_function(onnx_ops.rotary_embedding, (x, position_ids, *halves))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    ir.graph.erase_node(node)


def _past_uses(g: fx.Graph, cache: fx.Node, mask: fx.Node) -> None:
    """The cache inputs are the past now: a size taken of the cache's length is the mask's length instead."""
    for user in list(cache.users):
        if user.target is onnx_ops.gqa:
            continue
        if user.target is aten.sym_size.int and user.args[1] in (0, 1, 3):
            continue
        if user.target is aten.sym_size.int and user.args[1] in (2, -2):
            user.args = (mask, 1)
            continue
        require(False, f"--format onnx cannot carry {user.format_node()}: the graph reads the KV cache "
                       f"outside attention")


def _weight_node(ir: GraphIR, anchor: fx.Node, attr: str, tensor: torch.Tensor) -> fx.Node:
    ir.set_weight(attr, tensor)
    with ir.graph.inserting_before(anchor):
        return ir.graph.get_attr(attr)


def _tensor(ir: GraphIR, arg) -> torch.Tensor | None:
    if arg is None:
        return None
    require(isinstance(arg, fx.Node) and arg.op == "get_attr", "--format onnx needs quantized weights as weights")
    return ir.weight(arg.target)


def _int4_blocks(ir: GraphIR, node: fx.Node):
    x, qweight, scales, zeros, group, *rest = node.args
    q, s, z = _tensor(ir, qweight), _tensor(ir, scales).float(), _tensor(ir, zeros)
    n, k = q.shape[0], q.shape[1] * 2
    require(group >= 16 and group & (group - 1) == 0,
            f"--format onnx needs int4 groups of a power of two >= 16 (MatMulNBits' block), not {group}")
    b = q.reshape(n, k // group, group // 2)
    if z is None:
        zp = None  # MatMulNBits' default zero point is 8, lmforge's symmetric one
    elif torch.equal(z, z.round()) and bool(((z >= 0) & (z <= 15)).all()):
        u = z.to(torch.uint8)
        if u.shape[1] % 2:
            u = torch.cat([u, torch.zeros_like(u[:, :1])], 1)
        zp = int4.pack(u)  # two blocks a byte, the first in the low nibble: int4's own packing
    else:
        zp = z.float()
    return x, b, s, zp, k, n, 4, group, rest[0] if rest else node.kwargs.get("bias")


def _int8_blocks(ir: GraphIR, node: fx.Node):
    x, qweight, scales, *rest = node.args
    q, s = _tensor(ir, qweight), _tensor(ir, scales).float()
    n, k = q.shape
    blocks = -(-k // INT8_BLOCK)
    u = (q.to(torch.int16) + 128).to(torch.uint8)
    if blocks * INT8_BLOCK != k:
        u = torch.cat([u, torch.full((n, blocks * INT8_BLOCK - k), 128, dtype=torch.uint8)], 1)
    b = u.reshape(n, blocks, INT8_BLOCK)
    return (x, b, s.reshape(n, 1).expand(n, blocks).contiguous(), None, k, n, 8, INT8_BLOCK,
            rest[0] if rest else node.kwargs.get("bias"))


def _to_nbits(ir: GraphIR, node: fx.Node, accuracy_level: int, x, b, scales, zp, k, n, bits, block, bias) -> None:
    base = node.args[1].target
    args = [x, _weight_node(ir, node, f"{base}_nbits", b.contiguous()),
            _weight_node(ir, node, f"{base}_nbits_scales", scales.contiguous())]
    args.append(None if zp is None else _weight_node(ir, node, f"{base}_nbits_zp", zp.contiguous()))
    with ir.graph.inserting_before(node):
        new = ir.graph.call_function(onnx_ops.matmul_nbits, (*args, k, n, bits, block, accuracy_level, bias))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    ir.graph.erase_node(node)


def _widen(ir: GraphIR) -> None:
    """Every half-precision dtype in the graph becomes float32, and so does every half-precision weight."""
    for attr, t in ir.weights().items():
        if t.dtype in _HALVES:
            ir.set_weight(attr, t.float())
    for node in ir.graph.nodes:
        node.args = fx.node.map_aggregate(node.args, _wide)
        node.kwargs = fx.node.map_aggregate(node.kwargs, _wide)


def _wide(value):
    return torch.float32 if isinstance(value, torch.dtype) and value in _HALVES else value
