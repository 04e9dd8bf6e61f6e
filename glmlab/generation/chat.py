"""Chat templates: how a conversation becomes the text a model continues, as Hugging Face writes them (Jinja,
rendered in a sandbox as ``apply_chat_template`` renders them), so a run, its server, ``glmlab chat`` and an
export's ``tokenizer_config.json`` all render the same prompt.

A run carries its template in ``chat_template.jinja``. Without one it has the plain template for base models
(:data:`PLAIN_TEMPLATE`): each message as ``Role: content`` and a blank line (System, User, Assistant), then
``Assistant:``; a reply stops at a new ``User:`` / ``System:`` / ``Assistant:`` line. Fine-tuning for chat
(``finetune sft`` on ``{"messages": [...]}``) gives a run :data:`CHATML_TEMPLATE`, whose role tokens
``<|im_start|>`` / ``<|im_end|>`` are special tokens (:data:`glmlab.data.tokenizer.CHAT_TOKENS`) and whose reply
ends at ``<|im_end|>``. What ends a reply is read off the template (:attr:`ChatTemplate.end_tokens`: the
special token that follows an assistant message), so any template in that style works.
"""

from __future__ import annotations

import functools
from pathlib import Path

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from glmlab.data.tokenizer import CHAT_TOKENS, Tokenizer
from glmlab.errors import GlmlabError

CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOPS = ["\nUser:", "\nSystem:", "\nAssistant:"]
TEMPLATE_FILE = "chat_template.jinja"  # in a run directory, as transformers saves it beside a tokenizer
PLAIN_TEMPLATE = (
    "{%- set names = {'system': 'System', 'developer': 'System', 'user': 'User', 'assistant': 'Assistant'} -%}"
    "{%- for message in messages -%}{{ names[message['role']] ~ ': ' ~ message['content'] ~ '\n\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt is not defined or add_generation_prompt -%}Assistant:{%- endif -%}")
START, END = CHAT_TOKENS
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '" + START + "' ~ message['role'] ~ '\n' ~ message['content'] ~ '" + END + "\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '" + START + "assistant\n' }}{%- endif -%}")
_PROBE = [{"role": "user", "content": "\x00u"}, {"role": "assistant", "content": "\x00a"}]


def _raise(message: str) -> None:
    raise TemplateError(message)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    """Jinja as transformers renders chat templates: sandboxed, trimmed blocks, loop controls, raise_exception."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise
    return env


class ChatTemplate:
    """A compiled chat template and what it implies for generation: the special tokens that end a reply
    (``end_tokens``, and their ids in ``tokenizer``: ``end_ids``) and, for the plain template, the stop strings."""

    def __init__(self, source: str, tokenizer: Tokenizer | None = None) -> None:
        self.source = source
        try:
            self._template = _environment().from_string(source)
        except TemplateError as exc:
            raise GlmlabError(f"the chat template does not compile ({exc})", "fix its Jinja syntax") from None
        self.special = {"bos_token": tokenizer.special_tokens.get("bos", ""),
                        "eos_token": tokenizer.special_tokens.get("eos", "")} if tokenizer is not None else {}
        self.plain = source == PLAIN_TEMPLATE
        self.stops = list(CHAT_STOPS) if self.plain else []
        self.end_tokens = self._end_tokens(tokenizer) if tokenizer is not None else []
        self.end_ids = [tokenizer.hf.token_to_id(t) for t in self.end_tokens] if tokenizer is not None else []

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The text for ``messages`` (each ``{"role", "content"}``), with the assistant's opening when
        ``add_generation_prompt``."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special)
        except TemplateError as exc:
            raise GlmlabError(f"the chat template does not render these messages ({exc})",
                              "check the roles and contents, or the template") from None
        except Exception as exc:  # noqa: BLE001 — a template's own bug (a missing key, a type error)
            raise GlmlabError(f"the chat template does not render ({type(exc).__name__}: {exc})",
                              "fix the template") from None

    def _end_tokens(self, tokenizer: Tokenizer) -> list[str]:
        """The special token that follows an assistant message in this template (ChatML's ``<|im_end|>``), if
        one does: a reply ends there."""
        for probe in (_PROBE, [{"role": "system", "content": "\x00s"}, *_PROBE]):  # some require a system turn
            try:
                text = self.render(probe, add_generation_prompt=False)
                break
            except GlmlabError:
                continue
        else:
            return []  # it renders no conversation of ours: its replies end at <eos>
        tail = text[text.rfind("\x00a") + 2:] if "\x00a" in text else ""
        specials = [t.content for t in tokenizer.hf.get_added_tokens_decoder().values() if t.special]
        return [token for token in specials if token and tail.startswith(token)][:1]

    def assistant_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation's text and the character span of each assistant reply in it (its content and
        the token that ends it, not the whitespace after): what supervised fine-tuning scores. Refuses a
        template that renders a conversation's start differently once more messages follow."""
        text = self.render(messages, add_generation_prompt=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1], add_generation_prompt=False)
            if not (through.startswith(before) and text.startswith(through)):
                raise GlmlabError("the chat template renders the start of a conversation differently once more "
                                  "messages follow, so the replies cannot be told apart for training",
                                  "use a template whose text only grows with each message (e.g. the default)")
            spans.append((len(before), len(through.rstrip())))
        return text, spans


def run_template(run_dir: str | Path, tokenizer: Tokenizer) -> ChatTemplate:
    """The chat template a run carries (``chat_template.jinja``), or the plain one."""
    path = Path(run_dir) / TEMPLATE_FILE
    source = path.read_text(encoding="utf-8") if path.is_file() else PLAIN_TEMPLATE
    return ChatTemplate(source, tokenizer)


def render_chat(messages: list[dict[str, str]]) -> str:
    """The plain template's prompt for ``messages`` (each ``{"role", "content"}`` with a role of
    :data:`CHAT_ROLES`), in Python: what the Jinja renders, checked by the tests."""
    return "".join(f"{CHAT_ROLES[m['role']]}: {m['content']}\n\n" for m in messages) + "Assistant:"

