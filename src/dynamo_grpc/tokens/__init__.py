"""Token-level helpers shared by every component: block hashing, tokenizers, chat templates."""
