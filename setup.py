"""Package list for setuptools: src/ plus the generated contracts in gen/ (see pyproject.toml)."""

from setuptools import find_packages, setup

GENERATED = ["dynamo_grpc.v1", "dynamo_grpc.kserve", "dynamo_grpc.kserve.v2"]

setup(packages=find_packages("src") + GENERATED)
