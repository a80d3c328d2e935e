"""A readable text form of a `GraphIR` (what `lmforge inspect --ir` and `--print-after` show).

    %linear: f32[batch, seq, 256] = aten.linear.default(%mul_83, %model_layers_0_self_attn_q_proj_weight)

One line per node: name, spec, op and arguments. Weights print as `weight "source.name"`.
"""

from __future__ import annotations

from torch import fx

from lmforge.ir.graph import GraphIR, op_name


def _spec_str(node: fx.Node) -> str:
    spec = node.meta.get("spec")
    if spec is None:
        return "none"
    if isinstance(spec, tuple):
        return "(" + ", ".join(str(s) for s in spec) + ")"
    return str(spec)


def _arg_str(arg) -> str:
    if isinstance(arg, fx.Node):
        return f"%{arg.name}"
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_arg_str(a) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner}{',' if len(arg) == 1 else ''})"
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k}: {_arg_str(v)}" for k, v in arg.items()) + "}"
    if isinstance(arg, float) and abs(arg) >= 1e6:
        return f"{arg:.6g}"
    return str(arg)


def format_node(node: fx.Node, ir: GraphIR | None = None) -> str:
    if node.op == "placeholder":
        return f"input %{node.name}: {_spec_str(node)}"
    if node.op == "get_attr":
        source = ir.weight_names.get(node.target, node.target) if ir else node.target
        return f"%{node.name}: {_spec_str(node)} = weight {source!r}"
    if node.op == "output":
        return f"return {_arg_str(node.args[0])}"
    args = [_arg_str(a) for a in node.args] + [f"{k}={_arg_str(v)}" for k, v in node.kwargs.items()]
    return f"%{node.name}: {_spec_str(node)} = {op_name(node.target)}({', '.join(args)})"


def format_ir(ir: GraphIR) -> str:
    lines = [f"graph {ir.source or 'model'} {{"]
    lines += ["  " + format_node(n, ir) for n in ir.graph.nodes]
    lines.append("}")
    return "\n".join(lines)
