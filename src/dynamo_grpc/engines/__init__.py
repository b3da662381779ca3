"""Engines a worker can host: ``mocker`` (timing model), ``torch`` (a real model), ``trtllm``."""
