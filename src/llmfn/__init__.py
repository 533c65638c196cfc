"""llmfn: a pure-functional LLM runtime over PyTorch.

    model = llmfn.load("smollm2-135m-instruct")
    for text in llmfn.chat(model, [{"role": "user", "content": "Hi"}], max_tokens=32):
        print(text, end="")
"""

import os

# libgomp (torch's OpenMP) spins idle worker threads after each parallel region by default. On a
# small machine shared with an engine thread, a server or another process, that spinning takes the
# cores the work needs: measured on 2 cores with one other busy process, SmolLM2 decode ran at
# 5.7 tok/s by default and 16.5 tok/s with PASSIVE (and equally fast either way on an idle machine).
# It only takes effect when llmfn is imported before torch, as the CLI and the server do.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Large CPU tensors on transparent huge pages (torch's allocator madvises them when this is set):
# decode streams every weight once per token, and with 4 KiB pages the TLB misses cost bandwidth
# (a 540 MB read on 2 cores: 28.2 -> 32.1 GB/s).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

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
    "init_cache", "load", "load_embedding_model", "load_tokenizer", "logits", "sample",
]
