"""What a quantization scheme is, and the registry that finds one by name, by config or by the op it emits.

A scheme is one handler class in one file (`int4.py`, `fp8.py`), registered with `@register_scheme`, as
torchao maps each config to its handler. The handler owns everything the rest of lmforge knows about the
scheme, so that nothing outside `quant/` branches on it:

    config        its frozen, versioned config dataclass (`Int4Config`); `describe` writes it for the manifest;
                  `fit` adapts the settings the user left at their defaults to each weight's shape
    pack          float W (N, K) -> its named packed tensors, each with its weight kind; `dequantize` inverts
    op, op_args   the `lmforge::` op the quantize pass emits, and its arguments in the op's order
    linear_form   how that op's tensors line up with W, which is how tensor parallelism cuts them
    layout        the packed tensors' layout as the artifact's manifest documents it
    parse_token   its per-layer override tokens (`g32`, `sym`, ...; see `rules.py`); `label` for people

The ops themselves live in `codegen/` (which imports this package), so `op` is looked up by name when it is
first needed rather than imported here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx

from lmforge.errors import LmforgeError
from lmforge.ir.ops import LinearForm


@dataclass(frozen=True)
class PackedTensor:
    """One of the tensors a packed weight is stored as, saved as `<layer>.<suffix>`."""

    suffix: str  # "qweight", "scales", "zeros"
    tensor: torch.Tensor | None  # None: an optional tensor this config does without (symmetric int4's zeros)
    kind: str = "parameter"  # the weight kind: convert-dtype converts "parameter" weights, leaves "buffer" ones


class QuantScheme:
    """The handler of one scheme; subclasses fill in the class attributes and the methods that raise."""

    name: ClassVar[str]  # "int4": the `scheme=` option, the manifest's "scheme"
    config: ClassVar[type]  # the frozen, versioned config dataclass; `unsuitable(shape)` says why a weight won't do
    op_name: ClassVar[str]  # the op it emits: torch.ops.lmforge.<op_name>.default (defined in codegen/)
    layout: ClassVar[dict[str, Any]]  # the manifest's "layouts" entry: tensors, dequantize formula, compatibility
    token_help: ClassVar[tuple[str, ...]] = ()  # its override tokens, as error messages list them

    @property
    def op(self) -> torch._ops.OpOverload:
        return getattr(torch.ops.lmforge, self.op_name).default

    @property
    def settings(self) -> tuple[str, ...]:
        """The config's settings (every field but its version)."""
        return tuple(f.name for f in dataclasses.fields(self.config) if f.name != "version")

    def make_config(self, **settings: Any):
        """The config with `settings`; those it does not have are ignored (fp8 takes no group size)."""
        return self.config(**{k: v for k, v in settings.items() if k in self.settings})

    def fit(self, cfg, shape: tuple[int, ...], chosen: frozenset[str]):
        """The config a weight of `shape` (N, K) gets: `cfg`, or, where a setting the user left out of `chosen`
        does not suit the weight, the closest one that does (int4 picks a group size that divides K)."""
        return cfg

    def describe(self, cfg) -> dict[str, Any]:
        """`cfg` as JSON for the manifest: {"scheme": "int4", "group_size": 128, ..., "version": 1}."""
        return {"scheme": self.name, **dataclasses.asdict(cfg)}

    def label(self, described: dict[str, Any]) -> str:
        """A described config (`describe`'s output, as the manifest holds it) for people: "int4 g64 asym rtn"."""
        return self.name

    def parse_token(self, token: str) -> tuple[str, Any] | None:
        """The (setting, value) an override token stands for, or None when it is not one of this scheme's."""
        return None

    def pack(self, w: torch.Tensor, cfg, dtype: torch.dtype) -> list[PackedTensor]:
        """Quantize the float weight `w` (N, K) by `cfg` into its packed tensors, in the op's argument order;
        `dtype` is the compute dtype the graph will run in (schemes whose scales follow it use it)."""
        raise NotImplementedError

    def dequantize(self, tensors: dict[str, torch.Tensor], cfg) -> torch.Tensor:
        """The float32 weight (N, K) that packed tensors (by suffix; optional ones may be missing) stand for."""
        raise NotImplementedError

    def op_args(self, x: fx.Node, tensors: list[fx.Node | None], cfg, bias: Any) -> tuple:
        """The op's arguments, from the input, the packed tensors' get_attr nodes (in `pack`'s order) and bias."""
        raise NotImplementedError

    def linear_form(self, node: fx.Node) -> LinearForm:
        """How the op node's tensors line up with W (out_features, in_features), for cutting them."""
        raise NotImplementedError


SCHEMES: dict[str, QuantScheme] = {}  # name -> handler, in registration order (the order messages list them)
_BY_CONFIG: dict[type, QuantScheme] = {}
_BY_OP: dict[str, QuantScheme] = {}  # "lmforge::int4_linear" -> handler


def register_scheme(cls: type[QuantScheme]) -> type[QuantScheme]:
    """Register a handler class under its name, its config class and its op."""
    if cls.name in SCHEMES:
        raise ValueError(f"quantization scheme {cls.name!r} registered twice")
    scheme = cls()
    SCHEMES[cls.name] = scheme
    _BY_CONFIG[cls.config] = scheme
    _BY_OP[f"lmforge::{cls.op_name}"] = scheme
    return cls


def handler(name: str) -> QuantScheme:
    """The handler of the scheme called `name`; a one-line error for an unknown one."""
    if name not in SCHEMES:
        raise LmforgeError(f"unknown quantization scheme {name!r}; known: {', '.join(SCHEMES)}")
    return SCHEMES[name]


def handler_for(cfg) -> QuantScheme:
    """The handler of a scheme config (an `Int4Config`, ...)."""
    return _BY_CONFIG[type(cfg)]


def handler_for_op(target) -> QuantScheme | None:
    """The handler whose op a node's target is (its default overload), or None for any other target."""
    if not isinstance(target, torch._ops.OpOverload) or target._overloadname != "default":
        return None
    return _BY_OP.get(target._schema.name)
