"""The kserve SDK's InferenceGRPCClient (0.21), from its own virtualenv `.venv-kserve`.

kserve pins dependencies that conflict with ours, so it lives in a separate venv that tests do not create
(that would need the network). Create it once with:
    python3.11 -m venv .venv-kserve && .venv-kserve/bin/pip install kserve==0.21.0
"""

from __future__ import annotations

import subprocess

import pytest

from dynamo_grpc.launch.mesh import Mesh
from tests.conformance.conftest import MODEL, ROOT, run_client

pytestmark = pytest.mark.slow
KSERVE_PY = ROOT / ".venv-kserve" / "bin" / "python"


def _kserve_python() -> str:
    if not KSERVE_PY.exists():
        pytest.skip(
            f"{KSERVE_PY} missing: create it with `python3.11 -m venv .venv-kserve && "
            ".venv-kserve/bin/pip install kserve==0.21.0` (tests never download)"
        )
    probe = subprocess.run([str(KSERVE_PY), "-c", "import kserve"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"kserve does not import in {KSERVE_PY}: {probe.stderr.strip()[-300:]}")
    return str(KSERVE_PY)


def test_kserve_inference_grpc_client(mesh: Mesh) -> None:
    obs = run_client("kserve_client.py", mesh.frontend_grpc, MODEL, python=_kserve_python())
    assert obs["live"] and obs["ready"] and obs["model_ready"]
    raw, typed = obs["raw"], obs["typed"]
    assert raw["id"] == "k-raw" and typed["id"] == "k-typed"
    assert raw["finish_reason"] == "length" and raw["num_output_tokens"] == 9 and raw["text_output"]
    # Raw (binary) and typed contents requests decode to the same answer.
    assert {k: v for k, v in raw.items() if k != "id"} == {k: v for k, v in typed.items() if k != "id"}
    assert "INVALID_ARGUMENT" in obs["bad"]["text"] and "sampling_parameters" in obs["bad"]["text"]
