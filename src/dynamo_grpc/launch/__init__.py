"""Start a whole mesh as real processes: for run-local, tests and benchmarks."""

from dynamo_grpc.launch.mesh import Mesh, MeshConfig

__all__ = ["Mesh", "MeshConfig"]
