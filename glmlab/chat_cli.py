"""``glmlab chat RUN``: an interactive chat in the terminal — the run's chat template (as the server renders it),
replies streamed as they are written, the conversation kept as history (the oldest turns give way when the
context fills), a system prompt, and a few slash commands. Reads lines from any stdin, so it scripts too."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import TYPE_CHECKING, TextIO

from glmlab.cli_args import add_checkpoint
from glmlab.errors import GlmlabError

if TYPE_CHECKING:
    from glmlab.runs import LoadedRun

HELP = "/reset forgets the conversation, /system TEXT sets the system prompt, /exit (or Ctrl-D) quits"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a run in the terminal (its chat template, streamed replies)",
                       description=f"Chat with a run: each line you type is a user message; the reply streams as it "
                                   f"is written. {HELP}. Ctrl-C stops a reply.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--system", default=None, help="system prompt (the first message of the conversation)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL-style penalty (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed: the same conversation gives the same replies")
    p.add_argument("--compile-decode", action="store_true",
                   help="decode through a step compiled ahead of time (gpt on a CPU; needs a C++ compiler; ~15-30 s "
                        "before the first reply for a small model, the first time; then cached)")
    add_checkpoint(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(handler=cmd_chat)


class Conversation:
    """The history and how a reply is produced: the template's prompt, cut to fit by dropping the oldest turns
    (the system prompt stays), streamed through the engine."""

    def __init__(self, run: LoadedRun, system: str | None, settings: dict) -> None:
        self.run, self.system, self.settings = run, system, settings
        self.messages: list[dict[str, str]] = []
        self.turn = 0

    def prompt(self) -> tuple[list[int], int]:
        """The prompt's ids, and how many old messages were left out so that a reply fits the context."""
        run = self.run
        head = [{"role": "system", "content": self.system}] if self.system else []
        room = run.model.block_size - min(self.settings["max_new_tokens"], run.model.block_size // 2)
        for dropped in range(0, len(self.messages), 2):
            ids = run.tokenizer.encode(run.chat_template.render(head + self.messages[dropped:]))
            if len(ids) <= room:
                return ids, dropped
        raise GlmlabError(f"your message alone is longer than the context ({run.model.block_size} tokens with room "
                          "for a reply)", "write a shorter message, or lower --max-new-tokens")

    def reply(self, text: str, out: TextIO, prefix: str = "") -> str:
        """Stream the reply to ``text`` to ``out`` (after ``prefix``) and keep both in the history."""
        from glmlab.generation.generate import stream
        from glmlab.generation.settings import GenerationSettings

        self.messages.append({"role": "user", "content": text})
        try:
            ids, dropped = self.prompt()
        except GlmlabError:
            self.messages.pop()
            raise
        if dropped:
            self.messages = self.messages[dropped:]
            out.write(f"[the {dropped} oldest messages no longer fit the context and were left out]\n")
        out.write(prefix)
        template = self.run.chat_template
        seed = self.settings["seed"]
        settings = GenerationSettings(**{k: v for k, v in self.settings.items() if k != "seed"},
                                      seed=None if seed is None else seed + self.turn, stop=list(template.stops),
                                      stop_token_ids=list(template.end_ids), chat_reply=True)
        self.turn += 1
        parts: list[str] = []
        try:
            for delta in stream(self.run.model, self.run.tokenizer, ids, settings):
                parts.append(delta)
                out.write(delta)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        out.write("\n")
        answer = "".join(parts)
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def cmd_chat(args: argparse.Namespace) -> int:
    from glmlab.runs import load_run
    from glmlab.runtime import select_device

    run = load_run(args.run_dir, checkpoint=args.checkpoint, device=select_device(args.device))
    if not run.model.traits.left_to_right:
        raise GlmlabError(f"a {run.model.traits.family} run writes by mask-predict, not a reply token by token",
                          "chat with a gpt, lstm or glm run; use glmlab generate / fill for this one")
    if args.compile_decode:
        run.use_compiled_decode()
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k, "repetition_penalty": args.repetition_penalty, "seed": args.seed}
    from glmlab.generation.settings import GenerationSettings

    GenerationSettings(**settings).validate()  # a bad flag is refused before the first message
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 — line editing and history for input() on a terminal
    chat = Conversation(run, args.system, settings)
    interactive = sys.stdin.isatty()
    template = "plain" if run.chat_template.plain else "the run's"
    print(f"chatting with {args.run_dir} ({template} chat template, context {run.model.block_size} tokens). {HELP}.")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            chat.messages.clear()
            print("[conversation cleared]")
            continue
        if text.startswith("/system"):
            chat.system = text[len("/system"):].strip() or None
            print(f"[system prompt {'set' if chat.system else 'removed'}]")
            continue
        if text.startswith("/"):
            print(f"[unknown command {text.split()[0]}: {HELP}]")
            continue
        try:
            chat.reply(text, sys.stdout, prefix="assistant> ")
        except GlmlabError as exc:
            print(f"\n[{exc.problem}; {exc.fix}]" if exc.fix else f"\n[{exc.problem}]")
