"""The small demo language model embedded in lmforge (package data).

``model_dir()`` points at a Hugging Face-format folder (LlamaForCausalLM,
~3.7M parameters, bf16 safetensors, byte-level BPE tokenizer) so that
``lmforge optimize`` works offline. See README.md in this folder and
``scripts/train_demo_model.py`` for how it was trained.
"""

from __future__ import annotations

import importlib.resources
import pathlib


def model_dir() -> pathlib.Path:
    """Return the path of the shipped demo model folder."""
    return pathlib.Path(str(importlib.resources.files("lmforge.demo") / "model"))
