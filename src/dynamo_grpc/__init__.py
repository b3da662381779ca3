"""dynamo-grpc: a distributed LLM inference server built as a typed gRPC service mesh."""

from pathlib import Path
from pkgutil import extend_path

# The generated contracts live in gen/dynamo_grpc/ (v1, kserve) in a source checkout and
# are mapped into this package by the wheel. In a checkout (editable install or
# PYTHONPATH=src) add gen/ to the package path so both import the same way.
__path__ = extend_path(__path__, __name__)
_GEN = Path(__file__).resolve().parents[2] / "gen" / "dynamo_grpc"
if _GEN.is_dir() and str(_GEN) not in __path__:
    __path__.append(str(_GEN))

__version__ = "0.1.0"
