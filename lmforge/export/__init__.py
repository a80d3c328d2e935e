"""Writers: a compiled `GraphIR` out to a format that something runs. `artifact.py` writes lmforge's own
artifact (read back by `runtime/artifact.py`); `exporter.py` is `lmforge export`, reading an artifact and
handing it to the writer of one of the formats `formats.py` registers, one file each (`hf.py`:
compressed-tensors; `gguf.py`: llama.cpp; `onnx.py`: ONNX Runtime GenAI).

The package is also the API call `lmforge.export(artifact, format=..., output_dir=...)` (`lmforge.api.export`):
a package and a function cannot share the name `lmforge.export`, so the package is made callable.
"""

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, artifact, format, output_dir, **options):
        from lmforge.api import export

        return export(artifact, format, output_dir, **options)


sys.modules[__name__].__class__ = _CallableModule
