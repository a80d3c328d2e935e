"""lmforge: a compiler-style optimizer and runtime for Hugging Face language models.

    art = lmforge.optimize("path/to/hf-model", output_dir="out", dtype="bfloat16")
    eng = lmforge.load("out")
    seq = eng.generate(input_ids, max_new_tokens=32)
    lmforge.export("out", format="hf", output_dir="out-hf")
"""

from lmforge import export  # the package, callable as `lmforge.api.export`
from lmforge.api import load, optimize
from lmforge.errors import LmforgeError
from lmforge.version import __version__

__all__ = ["LmforgeError", "__version__", "export", "load", "optimize"]
