"""The KServe v2 (Triton-compatible) frontend: tensors in, routed generation, text out."""
