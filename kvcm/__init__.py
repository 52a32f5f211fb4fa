"""kvcm: a KV-cache-aware routing index for LLM inference clusters."""

__version__ = "0.1.0"
