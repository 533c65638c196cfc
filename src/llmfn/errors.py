"""The exceptions llmfn raises: one family, each message naming the file or value at fault."""


class LlmfnError(Exception):
    """Base of every error llmfn raises on purpose; the CLI prints it as one line."""


class CheckpointError(LlmfnError):
    """A checkpoint folder or file is missing, corrupt, or does not match its config."""


class UnsupportedModelError(LlmfnError):
    """The architecture or format is not one llmfn can run."""


class TokenizerError(LlmfnError):
    """A tokenizer file is missing or malformed, or an id is out of range."""


class RequestError(LlmfnError):
    """A generation request is invalid (bad parameter, prompt over the context)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
