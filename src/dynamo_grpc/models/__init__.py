"""Model sources (GGUF files, HF directories) and the model card that describes them to the mesh."""

from dynamo_grpc.models.card import (
    DEFAULT_BLOCK_SIZE,
    TOKENIZER_FILE,
    ModelCard,
    ModelSourceError,
    default_model_name,
    default_model_path,
    load_model_source,
)

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "TOKENIZER_FILE",
    "ModelCard",
    "ModelSourceError",
    "default_model_name",
    "default_model_path",
    "load_model_source",
]
