"""`bench frontend-profile`'s stage split: a function listed in a stage and called by another listed one
(the bytes path's `stream_frame` calling `chunk` for the last response) is counted once, not twice."""

from __future__ import annotations

import cProfile
import importlib.util
import time
from pathlib import Path

from dynamo_grpc.bench.frontend_profile import split

SOURCE = '''
import time

def _spin(s):  # CPU time, as the profiler's clock: a preempted spin is not longer
    t = time.thread_time() + s
    while time.thread_time() < t:
        pass

def chunk():
    _spin(0.002)

def stream_frame(last):
    _spin(0.001)
    if last:
        chunk()
'''


def test_nested_listed_functions_are_counted_once(tmp_path: Path) -> None:
    path = tmp_path / "kserve" / "responses.py"
    path.parent.mkdir()
    path.write_text(SOURCE)
    spec = importlib.util.spec_from_file_location("fake_responses", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    prof = cProfile.Profile(time.thread_time)  # as bench frontend-profile's
    prof.enable()
    for i in range(10):
        mod.stream_frame(last=i % 2 == 0)  # 10 frames, 5 of them call chunk
    mod.chunk()  # and one direct call (the message path)
    prof.disable()
    out = tmp_path / "p.prof"
    prof.dump_stats(str(out))
    got = split(out, requests=1, cpu_ms_per_request=1000.0)["response_build"]
    # 10 x 1 ms + 6 x 2 ms = 22 ms: chunk's 5 calls from stream_frame are inside stream_frame's cumulative time
    assert 21.0 < got < 28.0, got  # counted twice it would be 32 ms
