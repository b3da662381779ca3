"""Benchmarks that ship with the package (``dynamo-grpc bench ...``); each writes JSON and a PNG."""
