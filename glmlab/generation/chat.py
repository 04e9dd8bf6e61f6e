"""The plain chat template for base models, as Python (:func:`render_chat`, what the server renders) and as the
Jinja template Hugging Face tools apply (:data:`CHAT_TEMPLATE`, written into an export's tokenizer_config.json and
served at ``/tokenizer_info``): each message as ``Role: content`` followed by a blank line (roles System, User,
Assistant), then ``Assistant:`` for the model to continue. Generation also stops at a new ``User:`` /
``System:`` / ``Assistant:`` line, and the reply's leading whitespace is dropped. For example::

    System: You are terse.

    User: Hello

    Assistant:
"""

from __future__ import annotations

CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOPS = ["\nUser:", "\nSystem:", "\nAssistant:"]
CHAT_TEMPLATE = (
    "{%- set names = {'system': 'System', 'developer': 'System', 'user': 'User', 'assistant': 'Assistant'} -%}"
    "{%- for message in messages -%}{{ names[message['role']] ~ ': ' ~ message['content'] ~ '\n\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt is not defined or add_generation_prompt -%}Assistant:{%- endif -%}")


def render_chat(messages: list[dict[str, str]]) -> str:
    """The prompt for ``messages`` (each ``{"role", "content"}`` with a role of :data:`CHAT_ROLES`)."""
    return "".join(f"{CHAT_ROLES[m['role']]}: {m['content']}\n\n" for m in messages) + "Assistant:"
