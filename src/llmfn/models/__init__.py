"""Model families as pure math: each module holds its config type, `forward` and, for causal LMs,
`init_cache`. Every causal LM is mapped onto the Llama layout at load (llmfn.loading)."""

from llmfn.models import bert, llama

# config type -> the module whose functions run it
FAMILIES = {llama.LlamaConfig: llama, bert.BertConfig: bert}


def family(cfg):
    """The module of functions over models of this config (llmfn.models.llama, .bert)."""
    return FAMILIES[type(cfg)]


__all__ = ["FAMILIES", "bert", "family", "llama"]
