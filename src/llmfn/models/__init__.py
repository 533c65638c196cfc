"""Model families. Every causal LM is mapped onto the Llama forward at load."""

from llmfn.models import llama

__all__ = ["llama"]
