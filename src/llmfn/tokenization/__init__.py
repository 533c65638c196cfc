"""Format readers behind `llmfn.tokenizer.load_tokenizer`: each turns one tokenizer format into a
Hugging Face `tokenizers` pipeline plus the per-token bytes that llmfn decodes and streams from."""
