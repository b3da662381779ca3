"""One planner run of `dynamo-grpc bench planner` (no fixed fleets), for A/B comparisons of planner code versions.

Run it alternately with PYTHONPATH pointing at each version's src/ (interleaved, so both see the same box load):

    PYTHONPATH=<tree>/src:$PWD/gen python tools/planner_ab.py LABEL OUT.json [bench planner flags...]

It writes the run's summary (attainment, worker-seconds, failed, back-to-min, decisions) to OUT.json.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from dynamo_grpc.bench import planner as bench
from dynamo_grpc.bench.planner_load import Envelope, workload
from dynamo_grpc.bench.replay_trace import load_trace
from dynamo_grpc.planner.profile import Profile


def main(argv: list[str]) -> int:
    label, out = argv[0], Path(argv[1])
    args = bench._parser().parse_args(argv[2:])
    args.worker_args = args.worker_arg if args.worker_arg is not None else list(bench.DEFAULT_WORKER_ARGS)
    trace = load_trace(args.trace or bench.default_trace(), limit=args.limit)
    env = Envelope(args.base_rate, args.peak_factor, args.low, args.ramp, args.hold, args.tail)
    requests = workload(trace, env, args.max_input, args.max_output)
    profile = Profile.load(args.profile)
    work = Path(tempfile.mkdtemp(prefix="dynamo-planner-ab-"))
    r = asyncio.run(bench.run_once(f"planner-{label}", requests, args, profile, None, work))
    keep = ("sla_attainment", "ttft_attainment", "itl_attainment", "worker_seconds", "failed", "max_workers")
    summary = {k: r[k] for k in keep} | {
        "label": label,
        "code": bench.__file__,
        "back_to_min_at_s": r.get("back_to_min_at_s"),
        "decisions": r.get("decisions"),
        "timeline": r["timeline"],
        "mean_isl": float(np.mean([q.input_length for q in requests])),
    }
    out.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
