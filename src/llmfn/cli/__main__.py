"""`python -m llmfn.cli ...`, the same as the `llmfn` command."""

import sys

from llmfn.cli.commands import main

sys.exit(main())
