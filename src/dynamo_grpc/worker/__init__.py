"""The worker process: an engine behind Prefill/Decode/ModelFiles/KvEvents, registered in Consul."""
