"""Quantization schemes: the math (pure quantize/dequantize primitives) and which layers get which scheme.

    scheme   config (frozen, versioned)    file       packed tensors
    int4     Int4Config(group_size, symmetric, method)   int4.py    qdata (N, K/2) uint8, scales, zeros (N, K/G)
    fp8      Fp8Config()                   fp8.py     qdata (N, K) float8_e4m3fn, scale (N,) float32

The pass `quantize` (`passes/quantize.py`) rewrites linear layers into the ops `lmforge::int4_linear` and
`lmforge::fp8_linear` (`codegen/quant_linear.py`), whose references are the `dequantize` functions here.

Which layers: `LayerRules` matches glob patterns against each linear layer's name (its weight's parameter
name without `.weight`, e.g. `model.layers.0.mlp.down_proj`; the final projection is also `lm_head`):
layers matching a `skip` pattern keep their float weights, and `overrides` change the scheme's settings
per pattern, in order, the last match winning:

    overrides "*.down_proj:g32+sym;model.layers.0.*:skip"
        tokens: int4 | fp8 | g32 | g64 | g128 | g256 | sym | asym | rtn | hqq | skip
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from dataclasses import dataclass
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.quant.fp8 import Fp8Config
from lmforge.quant.int4 import Int4Config

SCHEMES: dict[str, type] = {"int4": Int4Config, "fp8": Fp8Config}
DEFAULT_SKIP = "lm_head"


def make_config(scheme: str, **settings: Any):
    """The scheme's config with `settings` (those it does not have are ignored: fp8 takes no group size)."""
    if scheme not in SCHEMES:
        raise LmforgeError(f"unknown quantization scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    cls = SCHEMES[scheme]
    names = {f.name for f in dataclasses.fields(cls)} - {"version"}
    return cls(**{k: v for k, v in settings.items() if k in names})


def describe(cfg) -> dict[str, Any]:
    """A config as JSON for the manifest: {"scheme": "int4", "version": 1, "group_size": 128, ...}."""
    scheme = next(name for name, cls in SCHEMES.items() if isinstance(cfg, cls))
    return {"scheme": scheme, **dataclasses.asdict(cfg)}


_TOKENS = {"sym": ("symmetric", True), "asym": ("symmetric", False), "rtn": ("method", "rtn"),
           "hqq": ("method", "hqq")}


@dataclass(frozen=True)
class LayerRules:
    """The scheme for each linear layer, from a default scheme, skip patterns and per-pattern overrides."""

    scheme: str
    settings: tuple[tuple[str, Any], ...] = ()  # the default scheme's settings, e.g. (("group_size", 64),)
    skip: tuple[str, ...] = (DEFAULT_SKIP,)
    overrides: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (pattern, tokens)

    @classmethod
    def parse(cls, scheme: str, settings: dict[str, Any], skip: str, overrides: str) -> "LayerRules":
        """skip: patterns separated by '|' or ','; overrides: "PATTERN:TOKEN+TOKEN;..." (see the module doc)."""
        make_config(scheme, **settings)  # fail now on a bad default
        patterns = tuple(p.strip() for p in skip.replace(",", "|").split("|") if p.strip())
        rules = []
        for item in filter(None, (i.strip() for i in overrides.split(";"))):
            pattern, colon, spec = item.rpartition(":")
            if not colon or not pattern.strip():
                raise LmforgeError(f"bad quantization override {item!r}: expected PATTERN:SETTINGS, "
                                   f"e.g. '*.down_proj:g32+sym'")
            tokens = tuple(t.strip().lower() for t in spec.split("+") if t.strip())
            trial, trial_scheme = dict(settings), scheme
            for token in tokens:
                trial_scheme = token if token in SCHEMES else trial_scheme
                _apply_token(trial, token, item)
            make_config(trial_scheme, **trial)  # fail now on a bad override
            rules.append((pattern.strip(), tokens))
        return cls(scheme, tuple(sorted(settings.items())), patterns, tuple(rules))

    def for_layer(self, names: list[str]):
        """(config, None) for a layer known by `names`, or (None, reason) when it keeps its float weight."""
        def hit(pattern: str) -> bool:
            return any(fnmatch.fnmatchcase(n, pattern) for n in names)

        scheme, settings, skipped = self.scheme, dict(self.settings), None
        for pattern in self.skip:
            if hit(pattern):
                skipped = f"skipped by pattern {pattern!r}"
        for pattern, tokens in self.overrides:  # a matching override without `skip` quantizes the layer
            if hit(pattern):
                skipped = f"skipped by override {pattern!r}" if "skip" in tokens else None
                for token in tokens:
                    if token in SCHEMES:
                        scheme = token
                    _apply_token(settings, token, pattern)
        if skipped:
            return None, skipped
        return make_config(scheme, **settings), None


def _apply_token(settings: dict[str, Any], token: str, where: str) -> None:
    if token in ("skip", *SCHEMES):
        return
    if token in _TOKENS:
        key, value = _TOKENS[token]
        settings[key] = value
    elif token.startswith("g") and token[1:].isdigit():
        settings["group_size"] = int(token[1:])
    else:
        raise LmforgeError(f"bad quantization setting {token!r} in {where!r}; use int4, fp8, g32, g64, g128, "
                           f"g256, sym, asym, rtn, hqq or skip")


def import_torchao_quietly():
    """torchao's `quant_primitives` module, or None when torchao is not installed. torchao logs a warning for
    each optional CUDA extension it cannot load on a CPU machine (and transformers imports it when it is
    there), so the first import happens here with those loggers silenced."""
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        from torchao.quantization import quant_primitives
    except ImportError:
        return None
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)
    return quant_primitives


def torchao_primitives():
    """torchao's quantization primitives, which the schemes' math uses; a one-line error without torchao."""
    primitives = import_torchao_quietly()
    if primitives is None:
        raise LmforgeError("quantizing needs torchao: pip install torchao")
    return primitives
