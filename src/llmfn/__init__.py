"""llmfn: a pure-functional LLM runtime over PyTorch.

    model = llmfn.load("smollm2-135m-instruct")
    for text in llmfn.chat(model, [{"role": "user", "content": "Hi"}], max_tokens=32):
        print(text, end="")
"""

from llmfn.errors import CheckpointError, LlmfnError, RequestError, TokenizerError, UnsupportedModelError
from llmfn.generate import chat, generate, logits
from llmfn.loading import load
from llmfn.model import GenerationDefaults, Model
from llmfn.models.llama import forward, init_cache
from llmfn.sampling import SamplingParams, sample
from llmfn.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "CheckpointError", "GenerationDefaults", "LlmfnError", "Model", "RequestError", "SamplingParams",
    "Tokenizer", "TokenizerError", "UnsupportedModelError", "chat", "forward", "generate", "init_cache",
    "load", "load_tokenizer", "logits", "sample",
]
