"""Writers: a compiled `GraphIR` out to a format that something runs. `artifact.py` writes lmforge's own
artifact (read back by `runtime/artifact.py`); writers for other serving systems' formats go beside it, one
format a file."""
