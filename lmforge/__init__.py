"""lmforge: a compiler-style optimizer and runtime for Hugging Face language models.

    art = lmforge.optimize("path/to/hf-model", output_dir="out", dtype="bfloat16")
    eng = lmforge.load("out")
    seq = eng.generate(input_ids, max_new_tokens=32)
"""

__version__ = "0.1.0"

from lmforge.api import load, optimize  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402

__all__ = ["LmforgeError", "__version__", "load", "optimize"]
