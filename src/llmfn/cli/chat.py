"""`llmfn chat` (an interactive conversation) and `llmfn run` (one answer).

Answers stream to stdout; notes, errors and perf reports go to stderr, so a piped
`llmfn chat < questions.txt > answers.txt` keeps only the answers (one per line of input)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

from llmfn.chat_template import apply_chat_template
from llmfn.cli.common import model_defaults, parse_knob
from llmfn.errors import LlmfnError, RequestError
from llmfn.generate import eos_ids, generate
from llmfn.model import Model
from llmfn.perf import PerfReport, TokenClock, format_report
from llmfn.sampling import KNOBS, Knob

DEFAULT_CHAT_TOKENS = 512
DEFAULT_RUN_TOKENS = 256

# /set keys: every sampling knob, and max_tokens (a chat setting, not a sampling parameter)
MAX_TOKENS = Knob(int, DEFAULT_CHAT_TOKENS, "most tokens per answer", ge=1)
SETTINGS: dict[str, Knob] = {**KNOBS, "max_tokens": MAX_TOKENS}

HELP = """commands:
  /help                 this list
  /exit                 leave (also /quit, /bye or Ctrl-D)
  /clear                forget the conversation (keeps the system prompt and settings)
  /undo                 forget the last question and its answer
  /system TEXT          set the system prompt (/system alone shows it)
  /set KEY VALUE        change a setting; /set alone lists them. keys: {keys}
  /perf [on|off]        print the decoder perf report after each answer (toggles)
  \"\"\"                   start and end a multi-line message
Ctrl-C stops an answer."""


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def stream_answer(model: Model, prompt: list[int], max_tokens: int, sampling: dict) -> tuple[Iterator[str], TokenClock]:
    """Text deltas of the answer to prompt ids (ends at EOS or max_tokens), and its clock."""
    clock = TokenClock(generate(model, prompt, max_tokens=max_tokens, **sampling), len(prompt))
    eos = set(eos_ids(model))

    def texts() -> Iterator[str]:
        detok = model.tokenizer.stream()
        for token in clock:
            if token in eos:
                break
            text = detok.add(token)
            if text:
                yield text
        tail = detok.flush()
        if tail:
            yield tail

    return texts(), clock


def room(model: Model, prompt: list[int], wanted: int | None, default: int) -> int:
    """max_tokens for this prompt: the wanted number (or default), capped by what the context has left."""
    context = model.cfg.max_position_embeddings
    left = context - len(prompt)
    if left < 1:
        raise RequestError(f"the prompt ({len(prompt)} tokens) fills this model's context of {context} tokens",
                           param="max_tokens")
    if wanted is None:
        return min(default, left)
    return wanted  # explicit: generate() reports a clear error if it does not fit


def print_stream(texts: Iterator[str], out=None) -> tuple[str, bool]:
    """Write deltas to stdout as they come; returns (the whole text, whether Ctrl-C stopped it)."""
    out = out or sys.stdout
    parts = []
    try:
        for text in texts:
            parts.append(text)
            out.write(text)
            out.flush()
    except KeyboardInterrupt:
        return "".join(parts), True
    return "".join(parts), False


def answer_once(model: Model, prompt: str, sampling: dict, max_tokens: int | None, system: str | None,
                raw: bool, perf: bool) -> int:
    """`llmfn run`: one answer to stdout."""
    require_causal(model)
    if raw:
        ids = model.tokenizer.encode_prompt(prompt)
    else:
        require_template(model, "llmfn run --raw")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = apply_chat_template(model.tokenizer, model.chat_template, messages)
    if not ids:
        raise RequestError("the prompt is empty", param="prompt")
    texts, clock = stream_answer(model, ids, room(model, ids, max_tokens, DEFAULT_RUN_TOKENS),
                                 {**model_defaults(model), **sampling})
    _, stopped = print_stream(texts)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if perf:
        note(format_report(clock.report()))
    if stopped:
        raise KeyboardInterrupt
    return 0


def require_causal(model: Model) -> None:
    if model.kind != "causal-lm":
        raise LlmfnError(f"{model.path}: this is an {model.kind} model; chat and run need a causal language model")


def require_template(model: Model, instead: str) -> None:
    if not model.chat_template:
        raise LlmfnError(f"{model.path} has no chat template; use `{instead}` for plain text completion")


@dataclass
class ChatSession:
    """The conversation state; `handle(line)` applies one line of input (a message or a /command)."""

    model: Model
    settings: dict
    system: str | None = None
    perf: bool = False
    history: list[dict] = field(default_factory=list)  # user/assistant messages, alternating
    last_report: PerfReport | None = None

    def messages(self, user_text: str | None = None) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        user = [{"role": "user", "content": user_text}] if user_text is not None else []
        return system + self.history + user

    def handle(self, line: str) -> bool:
        """Apply one message or command; False means leave."""
        if line.startswith("/"):
            return self.command(line)
        if line.strip():
            self.ask(line)
        return True

    def ask(self, text: str) -> None:
        messages = self.messages(text)
        prompt = apply_chat_template(self.model.tokenizer, self.model.chat_template, messages)
        sampling = {k: v for k, v in self.settings.items() if k != "max_tokens"}
        try:
            max_tokens = room(self.model, prompt, None, self.settings["max_tokens"])
        except RequestError:
            note(f"error: the conversation ({len(prompt)} tokens) fills the model's context of "
                 f"{self.model.cfg.max_position_embeddings} tokens; /undo or /clear to make room")
            return
        texts, clock = stream_answer(self.model, prompt, max_tokens, sampling)
        answer, stopped = print_stream(texts)
        sys.stdout.write("\n")
        sys.stdout.flush()
        if stopped:
            note("[stopped]")
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        self.last_report = clock.report()
        if self.perf:
            note(format_report(self.last_report))

    def command(self, line: str) -> bool:
        name, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name in ("/help", "/?"):
            note(HELP.format(keys=", ".join(SETTINGS)))
        elif name == "/clear":
            self.history = []
            note("conversation cleared")
        elif name == "/undo":
            if self.history:
                self.history = self.history[:-2]
                note("forgot the last question and answer")
            else:
                note("nothing to undo")
        elif name == "/system":
            if rest:
                self.system = rest
                note("system prompt set")
            else:
                note(f"system prompt: {self.system!r}" if self.system else "no system prompt")
        elif name == "/set":
            self.set(rest)
        elif name == "/perf":
            self.perf = {"on": True, "off": False}.get(rest.lower(), not self.perf)
            note(f"perf report {'on' if self.perf else 'off'}")
            if self.perf and self.last_report is not None and not rest:
                note(f"last answer: {format_report(self.last_report)}")
        else:
            note(f"error: unknown command {name}; /help lists the commands")
        return True

    def set(self, rest: str) -> None:
        if not rest:
            for key in SETTINGS:
                note(f"  {key} = {self.settings.get(key, 'none')}")
            return
        key, _, value = rest.partition(" ")
        key = key.replace("-", "_").lower()
        value = value.strip()
        if key not in SETTINGS:
            note(f"error: unknown setting {key!r}; one of: {', '.join(SETTINGS)}")
            return
        knob = SETTINGS[key]
        if knob.default is None and value.lower() == "none":
            self.settings.pop(key, None)
            note(f"{key} = none")
            return
        try:
            parsed = parse_knob(knob, value)
        except ValueError:
            rule = knob.rule()
            wanted = (rule if rule.startswith("a ") else f"a value {rule}") + (" or none" if knob.default is None else "")
            note(f"error: /set {key} needs {wanted}, got {value!r}")
            return
        self.settings[key] = parsed
        note(f"{key} = {parsed}")


def read_lines(interactive: bool) -> Iterator[str]:
    """Input lines; on a terminal with a prompt and readline history. \"\"\" brackets a multi-line message."""
    prompt, more = (">>> ", "... ") if interactive else ("", "")
    while True:
        try:
            line = input(prompt) if interactive else sys.stdin.readline()
        except EOFError:
            return
        except KeyboardInterrupt:
            note("\n(use /exit or Ctrl-D to leave)")
            continue
        if not interactive:
            if line == "":
                return
            line = line.rstrip("\n").rstrip("\r")
        if line.strip().startswith('"""'):
            parts = [line.strip()[3:]]
            while not parts[-1].rstrip().endswith('"""'):
                try:
                    nxt = input(more) if interactive else sys.stdin.readline()
                except EOFError:
                    nxt = ""
                if not interactive and nxt == "":
                    break
                parts.append(nxt.rstrip("\n"))
            text = "\n".join(parts).rstrip()
            yield text[:-3] if text.endswith('"""') else text
            continue
        yield line


def compiles(model: Model) -> bool:
    try:
        from llmfn.backend import should_compile
    except ImportError:
        return False
    return should_compile(model)


def _setup_readline() -> None:
    try:
        import atexit
        import readline

        from llmfn._env import home

        path = home() / "chat_history"
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            readline.read_history_file(path)
        readline.set_history_length(1000)
        atexit.register(readline.write_history_file, path)
    except (ImportError, OSError):
        pass


def run_chat(model: Model, name: str, sampling: dict, max_tokens: int | None, system: str | None, perf: bool) -> int:
    """`llmfn chat`: the read-answer loop until /exit or end of input."""
    require_causal(model)
    require_template(model, f"llmfn run --raw {name}")
    settings = {**model_defaults(model), **sampling, "max_tokens": max_tokens or DEFAULT_CHAT_TOKENS}
    session = ChatSession(model, settings, system=system, perf=perf)
    interactive = sys.stdin.isatty()
    if interactive:
        _setup_readline()
        note(f"llmfn chat with {name}: type a message, /help for commands, /exit to leave")
        if compiles(model):
            note("(the first answer also compiles the decode step, which takes a while once; --no-compile skips it)")
    for line in read_lines(interactive):
        if not session.handle(line):
            break
    return 0
