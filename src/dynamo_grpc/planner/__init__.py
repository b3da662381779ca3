"""SLA planner: profile one worker, forecast load, size the prefill/decode (or aggregated) pools (docs/planner.md)."""
