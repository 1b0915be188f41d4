"""`cadenza chat`: an interactive terminal conversation with a model.

The answer streams as it is decoded; the conversation is kept and re-rendered with the checkpoint's chat template
each turn (the oldest turns are dropped, with a notice, when it no longer fits the context). Commands: /reset,
/system TEXT, /stats, /help, /quit. Ctrl-C while an answer streams stops that answer (the part shown so far stays in
the conversation) and the session goes on; at the prompt, Ctrl-D or /quit leaves. Where the chat format marks the
model's reasoning (gpt-oss's analysis channel, think tags), it is shown on stderr and kept out of the conversation.
On a terminal, lines are edited with readline (arrow keys, Ctrl-R) and kept in a history file in the cache folder
(`chat_history`, see CADENZA_CACHE) from one session to the next.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from dataclasses import replace
from typing import TYPE_CHECKING, TextIO

from cadenza.cli.flags import add_command, add_engine_args, add_sampling_args, load, sampling
from cadenza.errors import CadenzaError
from cadenza.generation import Generation
from cadenza.text.reasoning import ReasoningSplitter

if TYPE_CHECKING:
    from cadenza.llm import LLM
    from cadenza.sampling import SamplingParams

HELP = """commands:
  /reset         forget the conversation (the system message stays)
  /system TEXT   set the system message (empty TEXT removes it)
  /stats         speed and where the experts ran, for the last answer
  /help          this text
  /quit          leave (also Ctrl-D); Ctrl-C stops an answer that is streaming"""

MIN_ANSWER = 16  # tokens an answer must have room for; older turns are dropped to keep it
HISTORY_LINES = 1000  # lines the chat history file keeps


class ChatSession:
    """The conversation state and one turn's work; the terminal loop is `loop`."""

    def __init__(self, llm: LLM, params: SamplingParams, out: TextIO = sys.stdout, err: TextIO = sys.stderr):
        self.llm, self.params, self.out, self.err = llm, params, out, err
        self.system: str | None = None
        self.turns: list[dict] = []  # user / assistant messages, oldest first
        self.last: Generation | None = None
        self.interrupted = False

    def messages(self, turns: list[dict]) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + turns

    def fit(self, user: str) -> list[int]:
        """The prompt ids for the conversation plus `user`, dropping the oldest turns until an answer fits."""
        turns = self.turns + [{"role": "user", "content": user}]
        dropped = 0
        while True:
            ids = self.llm.chat_prompt(self.messages(turns))
            if len(ids) + MIN_ANSWER <= self.llm.max_context or len(turns) == 1:
                break
            cut = 2 if len(turns) > 2 else 1  # a user message and its answer
            turns, dropped = turns[cut:], dropped + cut
        if len(ids) + 1 >= self.llm.max_context:
            engine = self.llm.engine
            fix = f" (or start again and {engine.context_fix})" if engine.context_fix else ""
            raise CadenzaError(
                f"This message needs {len(ids)} tokens with the chat template, but the context holds "
                f"{self.llm.max_context} ({engine.context_source}). Send a shorter message{fix}."
            )
        if dropped:
            self.err.write(f"[dropped the {dropped} oldest message(s) to fit the context]\n")
            self.turns = turns[:-1]
        return ids

    def answer(self, user: str) -> str:
        """Streams the answer to `user` and records the turn; Ctrl-C (SIGINT) stops the stream between tokens."""
        ids = self.fit(user)
        room = self.llm.max_context - len(ids)
        params = replace(self.params, max_tokens=min(self.params.max_tokens, room))
        gen = Generation(ids)
        self.interrupted = False
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):
            self.interrupted = True

        in_main = _is_main_thread()
        if in_main:
            signal.signal(signal.SIGINT, on_sigint)
        try:
            splitter = ReasoningSplitter.for_tokenizer(self.llm.tokenizer)
            splitter = splitter.fresh(ids) if splitter else None  # (a template may open the think tag itself)
            # closed when the loop stops early (Ctrl-C): that ends the request, and its stats count what it made
            with contextlib.closing(self.llm.stream_steps(ids, params, gen)) as steps:
                for step in steps:
                    reasoning, piece = splitter.add(step.token_id, step.text) if splitter else ("", step.text)
                    if reasoning:
                        self.err.write(reasoning)
                        self.err.flush()
                    if piece:
                        self.out.write(piece)
                        self.out.flush()
                    if self.interrupted:
                        break
            answer = splitter.answer if splitter else gen.text
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous)
        self.out.write("\n")
        if self.interrupted:
            self.err.write("[stopped]\n")
        self.out.flush()
        self.last = gen
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return answer

    def command(self, line: str) -> bool:
        """Handles a /command; False when the session should end."""
        name, _, arg = line.partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.turns = []
            self.err.write("[conversation cleared]\n")
        elif name == "/system":
            self.system = arg.strip() or None
            self.err.write("[system message set]\n" if self.system else "[system message removed]\n")
        elif name == "/stats":
            if self.last is None:
                self.err.write("[no answer yet]\n")
            else:
                reason = self.last.finish_reason
                reason = "stopped" if reason in (None, "abort") else reason  # abort: Ctrl-C stopped it
                self.err.write(f"[{reason}] {self.last.stats.summary()}\n")
        elif name == "/help":
            self.err.write(HELP + "\n")
        else:
            self.err.write(f"[unknown command {name}; /help lists the commands]\n")
        return True


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def loop(llm: LLM, params: SamplingParams, system: str | None = None, stdin: TextIO = sys.stdin) -> int:
    """The terminal loop: reads a line, answers it, until /quit or end of input."""
    session = ChatSession(llm, params)
    session.system = system or None
    llm.chat_prompt([{"role": "user", "content": "hi"}])  # no template: say so now, not after the first question
    tty = stdin.isatty()
    history = _line_editing() if tty else None
    sys.stderr.write("cadenza chat: type a message and press Enter; /help lists commands, /quit leaves.\n")
    try:
        return _read_loop(session, stdin, tty)
    finally:
        if history is not None:
            history()


def _line_editing():
    """Line editing and history for a terminal (arrow keys, Ctrl-R), through Python's readline, the history kept
    in the cache folder across sessions. Returns what saves the history, or None where readline is missing."""
    try:
        import readline
    except ImportError:  # Windows without pyreadline: input() still works, without editing
        return None
    from cadenza.paths import chat_history_file

    file = chat_history_file()
    with contextlib.suppress(OSError):  # none yet, or unreadable: start empty
        readline.read_history_file(file)
    readline.set_history_length(HISTORY_LINES)

    def save() -> None:
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(file)
        except OSError as e:
            sys.stderr.write(f"cadenza: the chat history could not be saved to {file} ({e})\n")

    return save


def _read_loop(session: ChatSession, stdin: TextIO, tty: bool) -> int:
    while True:
        try:
            if tty:
                line = input("> ")
            else:
                sys.stdout.write("> ")
                sys.stdout.flush()
                line = stdin.readline()
                if not line:
                    raise EOFError
                line = line.rstrip("\n")
        except EOFError:
            sys.stdout.write("\n")
            return 0
        except KeyboardInterrupt:
            sys.stderr.write("\n[Ctrl-C: /quit or Ctrl-D leaves]\n")
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line):
                return 0
            continue
        try:
            session.answer(line)
        except CadenzaError as e:
            sys.stderr.write(f"cadenza: {e}\n")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "chat",
        help="an interactive chat in the terminal (streams answers, keeps the history)",
        description="Loads a model and chats with it in the terminal through its chat template: each answer is "
        "streamed, and the conversation is kept (oldest turns dropped when it outgrows --max-context). Type /help "
        "in the chat for its commands; Ctrl-C stops an answer, Ctrl-D quits.",
        examples=[
            "cadenza chat -m mistralai/Mixtral-8x7B-Instruct-v0.1 --gpu-memory 24GiB",
            "# int4 experts (about a quarter of the bytes) and a system message",
            'cadenza chat -m Qwen/Qwen3-30B-A3B --experts int4 --system "Answer in one sentence."',
        ],
    )
    add_engine_args(p)
    p.add_argument("--system", default=None, help="a system message to start with")
    add_sampling_args(p, 1024)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    sampling(args, None)
    llm = load(args)
    params = sampling(args, llm)
    return loop(llm, params, system=args.system)
