"""`torch.compile(model, backend="lmforge")`: our pass pipeline on the graphs dynamo hands over.

Registered through the `torch_dynamo_backends` entry point, so no `import lmforge` is needed. Dynamo's graph
is lowered to ATen by AOTAutograd (functionalized; parameters arrive as inputs), wrapped as a "subgraph"
GraphIR and run through `BACKEND_PIPELINE`. Graph breaks are dynamo's business: each piece arrives here on
its own. If our pipeline fails on a piece, that piece runs as AOTAutograd gave it, with a warning, so a
model never fails to compile because of us.
"""

from __future__ import annotations

import warnings

import torch
from torch import fx

BACKEND_PIPELINE = "remove-noops,constant-fold,dce"


def _optimize_graph(gm: fx.GraphModule, example_inputs) -> fx.GraphModule:
    from lmforge.ir.graph import GraphIR, KVCacheSpec
    from lmforge.ir.spec import spec_from_value
    from lmforge.passes import PassManager

    for node in gm.graph.nodes:
        node.meta["spec"] = spec_from_value(node.meta.get("val"))
    ir = GraphIR(gm=gm, config={}, kv=KVCacheSpec([], torch.float32), weight_names={}, kind="subgraph")
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    try:
        with unset_fake_temporarily():  # AOTAutograd calls us under its FakeTensorMode; folding needs real tensors
            PassManager(BACKEND_PIPELINE).run(ir)
    except Exception as e:  # fall back to the unoptimized graph rather than break the user's model
        warnings.warn(f"lmforge backend: pipeline failed, running this graph unoptimized: {e}", stacklevel=2)
        return gm
    return ir.gm


def _compiler(gm: fx.GraphModule, example_inputs):
    from functorch.compile import make_boxed_func

    return make_boxed_func(_optimize_graph(gm, example_inputs))


def lmforge_backend(gm: fx.GraphModule, example_inputs, **kwargs):
    """The dynamo backend: AOTAutograd to ATen, then lmforge's passes on forward (and backward) graphs."""
    from torch._dynamo.backends.common import aot_autograd

    return aot_autograd(fw_compiler=_compiler, bw_compiler=_compiler)(gm, example_inputs, **kwargs)
