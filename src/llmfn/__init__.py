"""llmfn: a pure-functional LLM runtime over PyTorch.

    model = llmfn.load("smollm2-135m-instruct")
    for text in llmfn.chat(model, [{"role": "user", "content": "Hi"}], max_tokens=32):
        print(text, end="")
"""

from llmfn._env import ENV_SET_BY_LLMFN  # first: sets llmfn's environment defaults before torch loads
from llmfn.embed import embed, embed_with_usage, load_embedding_model
from llmfn.engine import (
    Engine,
    GenerationEvent,
    GenerationRequest,
    GenerationResult,
    QueueFullError,
    TokenLogprob,
)
from llmfn.errors import CheckpointError, LlmfnError, RequestError, TokenizerError, UnsupportedModelError
from llmfn.generate import chat, generate, logits
from llmfn.loading import load
from llmfn.model import GenerationDefaults, Model
from llmfn.models.llama import forward, init_cache
from llmfn.sampling import SamplingParams, sample
from llmfn.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "CheckpointError", "Engine", "GenerationDefaults", "GenerationEvent", "GenerationRequest", "GenerationResult",
    "LlmfnError", "Model", "QueueFullError", "RequestError", "SamplingParams", "TokenLogprob", "Tokenizer",
    "TokenizerError", "UnsupportedModelError", "chat", "embed", "embed_with_usage", "forward", "generate",
    "init_cache", "load", "load_embedding_model", "load_tokenizer", "logits", "sample", "ENV_SET_BY_LLMFN",
]
