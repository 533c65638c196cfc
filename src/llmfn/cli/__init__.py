"""The `llmfn` command line (pyproject's console script `llmfn = "llmfn.cli:main"`).

commands: the parser and one function per command; chat: `llmfn chat` and `llmfn run`; doctor:
`llmfn doctor` and `llmfn models`; progress: bars and spinners on stderr; common: what they share.
Imports go one way, down: commands -> chat, doctor -> common -> progress."""

from llmfn.cli.commands import main

__all__ = ["main"]
