"""The KV-aware router: an index of which worker holds which KV block, and a cost policy.

``indexer`` (what is cached where), ``approx`` (routing without events), ``active``
(in-flight load per worker), ``policy`` (cost, temperature, busy threshold), ``router``
(the plain-Python core), ``service`` (protobuf adapter), ``main`` (the process).
"""
