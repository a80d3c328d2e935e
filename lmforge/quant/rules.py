"""Which linear layer gets which scheme: `LayerRules`, from a default scheme, skip globs and overrides.

`LayerRules` matches glob patterns against each linear layer's name (its weight's parameter name without
`.weight`, e.g. `model.layers.0.mlp.down_proj`; the final projection is also `lm_head`): layers matching a
`skip` pattern keep their float weights, and `overrides` change the scheme's settings per pattern, in
order, the last match winning:

    overrides "*.down_proj:g32+sym;model.layers.0.*:skip"

A token is a scheme's name (`int4`, `fp8`), `skip`, or one of a scheme's setting tokens, which its handler
parses (`Int4Scheme.parse_token`: g32 | g64 | g128 | g256 | sym | asym | rtn | hqq). Settings are shared
between schemes, and each config takes the ones it has.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.quant.scheme import SCHEMES, handler

DEFAULT_SKIP = "lm_head"


def make_config(scheme: str, **settings: Any):
    """The scheme's config with `settings` (those it does not have are ignored: fp8 takes no group size)."""
    return handler(scheme).make_config(**settings)


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

    def for_layer(self, names: list[str], shape: tuple[int, ...] | None = None):
        """(config, None) for a layer known by `names`, or (None, reason) when it keeps its float weight; with
        the weight's `shape` (N, K), the settings left at their defaults are fitted to it (`QuantScheme.fit`)."""
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
        cfg = make_config(scheme, **settings)
        return (cfg if shape is None else handler(scheme).fit(cfg, tuple(shape), frozenset(settings))), None


def _apply_token(settings: dict[str, Any], token: str, where: str) -> None:
    if token in ("skip", *SCHEMES):
        return
    for scheme in SCHEMES.values():
        setting = scheme.parse_token(token)
        if setting is not None:
            key, value = setting
            settings[key] = value
            return
    known = [*SCHEMES, *(t for scheme in SCHEMES.values() for t in scheme.token_help)]
    raise LmforgeError(f"bad quantization setting {token!r} in {where!r}; use {', '.join(known)} or skip")
