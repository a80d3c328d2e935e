"""Capture: a Hugging Face causal LM -> `GraphIR` through `torch.export`.

The model is traced once, with dynamic batch, sequence and cache lengths, into an ATen graph that follows
the calling convention in `graph.py`. The KV cache becomes explicit graph state: we hand the model a
`transformers` Cache whose layers are the graph's own `k_cache_i`/`v_cache_i` inputs, so the model's
attention writes into them (`index_copy_`) and reads them back, and the exported graph owns no cache
object. Nothing here knows any architecture: the cache geometry (layers, kv heads, head dims) is measured
by running the model once on two tokens.

After export the functional graph is turned back into the runtime's form: parameters, buffers and constants
become `get_attr` weights, and the cache mutations that export functionalized (a functional `index_copy`
plus an extra output) become in-place `index_copy_` on the cache inputs.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch
from torch import fx, nn

from lmforge.errors import CaptureError
from lmforge.ir.graph import INPUT_NAMES, GraphIR, KVCacheSpec, KVLayerSpec
from lmforge.ir.spec import spec_from_value


def load_hf_model(source: str, dtype: torch.dtype | None = None) -> tuple[nn.Module, torch.dtype]:
    """Load a causal LM with `from_pretrained` (a local directory, or a hub id when online), in `dtype`.

    Returns the model and the dtype its checkpoint declares (float32 when it declares none)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:  # pragma: no cover - transformers is a dependency of capture
        raise CaptureError("capturing a model needs `transformers`: pip install transformers") from e
    from pathlib import Path

    local = Path(source)
    if local.is_dir() and not (local / "config.json").is_file():
        raise CaptureError(f"cannot load model {source!r}: the directory has no config.json (save it with save_pretrained)")
    kwargs: dict[str, Any] = {"attn_implementation": "sdpa"}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        declared = AutoConfig.from_pretrained(source)
        declared = getattr(declared, "dtype", None) or getattr(declared, "torch_dtype", None)
        if isinstance(declared, str):
            declared = getattr(torch, declared.removeprefix("torch."), None)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except (ValueError, NotImplementedError) as e:
            if "sdpa" not in str(e).lower():
                raise
            kwargs["attn_implementation"] = "eager"
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        raise CaptureError(f"cannot load model {source!r}: {first_line(e)}") from e
    except ValueError as e:
        raise CaptureError(f"unsupported model {source!r}: {first_line(e)}") from e
    return model.eval(), declared if isinstance(declared, torch.dtype) else torch.float32


def load_hf_model_from_state(source: str, state: dict[str, torch.Tensor], config: dict[str, Any]) -> nn.Module:
    """A causal LM built from `config` (a config.json's contents) in float32, its weights from `state`: how a
    checkpoint whose tensors lmforge reads itself (compressed-tensors) is loaded for capture. Every tensor in
    `state` must be one of the model's, and every parameter of the model must be in `state` (or tied to one)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {k: v for k, v in config.items() if k not in ("model_type", "quantization_config")}
    try:
        cfg = AutoConfig.for_model(config.get("model_type", ""), **settings)
        try:
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
        except (ValueError, NotImplementedError) as e:
            if "sdpa" not in str(e).lower():
                raise
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    except ValueError as e:
        raise CaptureError(f"unsupported model {source!r}: {first_line(e)}") from e
    result = model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                                   strict=False)
    if result.unexpected_keys:
        raise CaptureError(f"{source}: tensor {result.unexpected_keys[0]!r} is not one of "
                           f"{type(model).__name__}'s")
    tied = set(tied_names(model))
    persistent = {name for name, _ in model.named_parameters()} | set(model.state_dict())
    missing = [k for k in result.missing_keys if k in persistent and k not in tied]
    if missing:
        raise CaptureError(f"{source}: the checkpoint lacks {missing[0]!r}")
    return model.eval()


def first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


# --- the cache handed to the model -------------------------------------------------------------------


def _cache_classes():
    from transformers.cache_utils import Cache, CacheLayerMixin

    class GraphCacheLayer(CacheLayerMixin):
        """One layer's K/V: a graph input of shape (batch, n_kv_heads, kv_len, head_dim).

        The last `seq` slots are where the new tokens go; the rest holds the past. With `keys=None` the
        layer only records the shapes it is given (the geometry probe) and acts like a growing cache.
        """

        is_compileable = True
        is_sliding = False

        def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
            super().__init__()
            self.keys, self.values = keys, values
            self.is_initialized = keys is not None
            self.seen: tuple[torch.Size, torch.Size] | None = None

        def lazy_initialization(self, key_states, value_states) -> None:
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            if self.keys is None:  # probe
                self.seen = (key_states.shape, value_states.shape)
                return key_states, value_states
            seq, kv_len = key_states.shape[-2], self.keys.shape[-2]
            slots = torch.arange(kv_len - seq, kv_len, device=key_states.device)
            self.keys.index_copy_(2, slots, key_states.to(self.keys.dtype))
            self.values.index_copy_(2, slots, value_states.to(self.values.dtype))
            return self.keys, self.values

        def get_mask_sizes(self, query_length) -> tuple[int, int]:
            if self.keys is None:  # transformers < 5.20 passes cache_position here, later ones its length
                return (query_length.shape[0] if isinstance(query_length, torch.Tensor) else query_length), 0
            return self.keys.shape[-2], 0

        def get_seq_length(self) -> int:
            if self.keys is None:
                return 0
            return self.keys.shape[-2] - self._query_length

        def get_max_length(self) -> int:
            return -1 if self.keys is None else self.keys.shape[-2]

    class GraphCache(Cache):
        def __init__(self, layers: list, query_length: int):
            super().__init__(layers=layers)
            for layer in layers:
                layer._query_length = query_length

    return GraphCache, GraphCacheLayer


def _cache_kwarg(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise CaptureError(f"{type(model).__name__}.forward takes no KV cache (no `cache` or `past_key_values`)")


def probe_kv_geometry(model: nn.Module) -> list[KVLayerSpec]:
    """Run the model on two tokens and record the K/V shape each attention layer hands its cache."""
    GraphCache, GraphCacheLayer = _cache_classes()
    n_layers = _num_layers(model)
    layers = [GraphCacheLayer() for _ in range(n_layers)]
    cache = GraphCache(layers, query_length=2)
    ids = torch.zeros(1, 2, dtype=torch.long, device=_device(model))
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{_cache_kwarg(model): cache})
    missing = [i for i, layer in enumerate(layers) if layer.seen is None]
    if len(missing) == n_layers:
        raise CaptureError(
            f"{type(model).__name__} never wrote to the transformers Cache: its attention does not use the Cache API"
        )
    if missing:
        raise CaptureError(f"{type(model).__name__}: layers {missing} keep no KV cache (hybrid models are not supported)")
    specs = []
    for layer in layers:
        (b, hk, t, dk), (_, hv, _, dv) = layer.seen
        if hk != hv or t != 2:
            raise CaptureError(f"unexpected K/V shapes {tuple(layer.seen[0])} / {tuple(layer.seen[1])} from the cache")
        specs.append(KVLayerSpec(n_kv_heads=int(hk), k_head_dim=int(dk), v_head_dim=int(dv)))
    return specs


def _num_layers(model: nn.Module) -> int:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(text, key, None):
            return int(getattr(text, key))
    raise CaptureError(f"cannot tell how many layers {type(model).__name__} has from its config")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class _Exportable(nn.Module):
    """The model behind the calling convention of `graph.py`."""

    def __init__(self, model: nn.Module, n_layers: int):
        super().__init__()
        self.model = model
        self.n_layers = n_layers
        self.cache_kwarg = _cache_kwarg(model)
        self.takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters

    def forward(self, input_ids, position_ids, attention_mask, *kv):
        GraphCache, GraphCacheLayer = _cache_classes()
        layers = [GraphCacheLayer(kv[2 * i], kv[2 * i + 1]) for i in range(self.n_layers)]
        cache = GraphCache(layers, query_length=input_ids.shape[1])
        kwargs = {self.cache_kwarg: cache}
        if self.takes_cache_position:  # transformers < 5.20 still reads it
            kv_len = attention_mask.shape[1]
            kwargs["cache_position"] = torch.arange(kv_len - input_ids.shape[1], kv_len, device=input_ids.device)
        out = self.model(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=True, **kwargs
        )
        return (out.logits,)


# --- export and lowering to the runtime form ---------------------------------------------------------


def capture(model: nn.Module, source: str = "", kv_dtype: torch.dtype | None = None) -> GraphIR:
    """Trace `model` (a transformers causal LM) into a `GraphIR` with dynamic batch, seq and kv_len."""
    from torch.export import Dim

    if not hasattr(model, "config"):
        raise CaptureError(f"{type(model).__name__} is not a transformers model (it has no `config`)")
    model = model.eval()
    kv_layers = probe_kv_geometry(model)
    dtype = kv_dtype or next(model.parameters()).dtype
    device = _device(model)

    # Example sizes: none may be 0 or 1 (export specializes those) and no two equal, so that no guard
    # ties two dimensions together by accident.
    batch, seq, kv_len = 2, 3, 5
    example = [
        torch.randint(0, 8, (batch, seq), device=device),
        torch.arange(kv_len - seq, kv_len, device=device).expand(batch, seq).contiguous(),
        torch.ones(batch, kv_len, dtype=torch.long, device=device),
    ]
    for spec in kv_layers:
        example.append(torch.zeros(batch, spec.n_kv_heads, kv_len, spec.k_head_dim, dtype=dtype, device=device))
        example.append(torch.zeros(batch, spec.n_kv_heads, kv_len, spec.v_head_dim, dtype=dtype, device=device))
    d_batch, d_seq, d_kv = Dim("batch", min=1, max=4096), Dim("seq", min=1, max=1 << 20), Dim("kv_len", min=1, max=1 << 20)
    dynamic = [{0: d_batch, 1: d_seq}, {0: d_batch, 1: d_seq}, {0: d_batch, 1: d_kv}]
    dynamic += [{0: d_batch, 2: d_kv}] * (2 * len(kv_layers))

    wrapper = _Exportable(model, len(kv_layers))
    try:
        with torch.no_grad():
            ep = torch.export.export(wrapper, tuple(example), dynamic_shapes=(*dynamic[:3], tuple(dynamic[3:])), strict=False)
    except Exception as e:  # export's errors are many and deep; the first line names the construct
        raise CaptureError(f"torch.export cannot capture {type(model).__name__}: {first_line(e)}") from e

    ep = ep.run_decompositions({})  # to core ATen functional form, keeping SDPA and other composite ops
    config = model.config.to_dict()
    if not config.get("architectures"):  # models built from a config, not from_pretrained, leave it empty
        config["architectures"] = [type(model).__name__]
    ir = _lower(ep, config, KVCacheSpec(kv_layers, dtype), source or type(model).__name__)
    ir.aliases = {name: names for name, names in tied_names(model).items() if name in ir.weight_names.values()}
    return ir


def tied_names(model: nn.Module) -> dict[str, list[str]]:
    """Name -> every name of the same tensor, in registration order, for the model's tied weights (an lm_head
    sharing the input embedding). torch.export keeps one of the names; exporters write the one the source
    checkpoint held, the first."""
    groups: dict[int, list[str]] = {}
    for name, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        groups.setdefault(id(t), []).append(name)
    return {name: names for names in groups.values() if len(names) > 1 for name in names}


def _attr_name(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", name)


def _lower(ep, config: dict, kv: KVCacheSpec, source: str) -> GraphIR:
    from torch.export.graph_signature import InputKind, OutputKind

    gm: fx.GraphModule = ep.graph_module
    graph = gm.graph
    sig = ep.graph_signature
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == len(sig.input_specs)

    state = dict(ep.state_dict)
    state.update(ep.constants)
    weight_names: dict[str, str] = {}
    weight_kinds: dict[str, str] = {}
    user_inputs: list[fx.Node] = []
    new_gm = fx.GraphModule(nn.Module(), graph)

    # Placeholders for weights become get_attr nodes; user inputs get their convention names.
    for node, spec in zip(placeholders, sig.input_specs):
        if spec.kind == InputKind.USER_INPUT:
            user_inputs.append(node)
            continue
        if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            raise CaptureError(f"unsupported graph input kind {spec.kind.name} for {spec.target}")
        tensor = state[spec.target]
        name = spec.target.removeprefix("model.")  # the name in the user's model, not in our wrapper
        attr = _attr_name(name)
        while attr in weight_names:
            attr += "_"
        weight_names[attr] = name
        if spec.kind != InputKind.PARAMETER:
            weight_kinds[attr] = "buffer"
        new_gm.register_buffer(attr, tensor.detach())  # shared with the model: passes replace weights, never mutate them
        with graph.inserting_before(node):
            get = graph.get_attr(attr)
        get.meta.update(node.meta)
        node.replace_all_uses_with(get)
        graph.erase_node(node)

    by_export_name = {n.name: n for n in user_inputs}
    names = list(INPUT_NAMES) + [f"{kv_}_cache_{i}" for i in range(len(kv.layers)) for kv_ in ("k", "v")]
    for node, name in zip(user_inputs, names):
        node.name = node.target = name

    # Outputs: user-input mutations (the cache writes) become in-place ops; the logits stay.
    out_node = next(n for n in graph.nodes if n.op == "output")
    outs = list(out_node.args[0])
    kept = []
    for value, spec in zip(outs, sig.output_specs):
        if spec.kind == OutputKind.USER_OUTPUT:
            kept.append(value)
        elif spec.kind == OutputKind.USER_INPUT_MUTATION:
            _reinplace(graph, value, by_export_name[spec.target])
        else:
            raise CaptureError(f"the model mutates its own state ({spec.kind.name} {spec.target}); not supported")
    out_node.args = (tuple(kept),)

    graph.eliminate_dead_code()
    graph.lint()
    new_gm.recompile()

    symbols = _symbol_names(user_inputs)
    for node in graph.nodes:
        node.meta["spec"] = spec_from_value(node.meta.get("val"), symbols)
    return GraphIR(gm=new_gm, config=config, kv=kv, weight_names=weight_names, weight_kinds=weight_kinds, source=source)


def _reinplace(graph: fx.Graph, new_value: fx.Node, target: fx.Node) -> None:
    """Make the functional update `new_value` of graph input `target` write into `target` itself.

    `index_copy(target, dim, index, src)` whose only other readers of `target` run before it becomes
    `index_copy_`; any other update falls back to a `copy_` of the whole new value into `target`.
    """
    aten = torch.ops.aten
    order = {n: i for i, n in enumerate(graph.nodes)}
    if (
        new_value.op == "call_function"
        and new_value.target is aten.index_copy.default
        and new_value.args[0] is target
        and all(order[u] <= order[new_value] for u in target.users if u is not new_value)
    ):
        new_value.target = aten.index_copy_.default
        return
    with graph.inserting_after(new_value):
        copy = graph.call_function(aten.copy_.default, (target, new_value))
    copy.meta.update(new_value.meta)


def _symbol_names(user_inputs: list[fx.Node]) -> dict[str, str]:
    """export's symbols (`s0`...) -> the convention's names, read off the inputs' fake shapes."""
    ids, _, mask = user_inputs[:3]
    pairs = {"batch": ids.meta["val"].shape[0], "seq": ids.meta["val"].shape[1], "kv_len": mask.meta["val"].shape[1]}
    return {str(v): k for k, v in pairs.items() if isinstance(v, torch.SymInt)}
