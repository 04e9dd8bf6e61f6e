"""Multi-turn supervised fine-tuning data: ``{"messages": [{"role", "content"}, ...]}`` JSONL, rendered by the
run's chat template and scored on the assistant's turns only (their content and the token that ends each one),
as ``trl``'s assistant-only loss does; and packing of short examples into full rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from glmlab.data.dataset import IGNORE_INDEX
from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import DataError
from glmlab.finetune.examples import Examples, Pair, read_jsonl_objects
from glmlab.generation.chat import CHAT_ROLES, ChatTemplate

FORMAT_HINT = 'write one {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]} per line'


@dataclass
class Conversation:
    messages: list[dict[str, str]]

    def last_turn(self, template: ChatTemplate) -> Pair:
        """The conversation up to its last assistant turn as a prompt (rendered, the assistant's opening added)
        and that turn as the completion: what scoring generations compares."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return Pair(template.render(self.messages[:last], add_generation_prompt=True), self.messages[last]["content"])


def is_conversations(path: str | Path) -> bool:
    """Whether a JSONL file holds conversations (its first object has ``messages``) rather than pairs."""
    rows = read_jsonl_objects(Path(path))
    return bool(rows) and "messages" in rows[0][1]


def read_conversations(path: str | Path) -> list[Conversation]:
    """Conversations from a JSONL file, each with roles of :data:`CHAT_ROLES`, string contents and at least one
    assistant turn (there is nothing to learn from one without)."""
    path = Path(path)
    conversations = []
    for number, row in read_jsonl_objects(path):
        where = f"{path}, line {number}"
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: no list of messages (fields: {', '.join(row)})", FORMAT_HINT)
        clean = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise DataError(f"{where}: message {i} is not an object with role and content", FORMAT_HINT)
            role, content = message.get("role"), message.get("content")
            if role not in CHAT_ROLES:
                raise DataError(f"{where}: message {i} has role {role!r}; the roles are {', '.join(CHAT_ROLES)}",
                                "rename the role")
            if not isinstance(content, str):
                raise DataError(f"{where}: message {i} ({role}) has no text content", FORMAT_HINT)
            clean.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" for m in clean):
            raise DataError(f"{where}: the conversation has no assistant turn, so nothing to train on",
                            "give each conversation at least one assistant message, or drop it")
        conversations.append(Conversation(clean))
    if not conversations:
        raise DataError(f"{path} holds no conversations", FORMAT_HINT)
    return conversations


def encode_conversations(tokenizer: Tokenizer, template: ChatTemplate, conversations: list[Conversation],
                         max_len: int, bos: bool) -> Examples:
    """Inputs and targets: each conversation rendered by ``template`` and encoded whole; a target is scored when its
    token overlaps an assistant reply (content and closing token). Too long a conversation loses its first
    tokens (the oldest turns)."""
    inputs, targets, cut = [], [], 0
    for conversation in conversations:
        text, spans = template.assistant_spans(conversation.messages)
        encoding = tokenizer.hf.encode(text, add_special_tokens=False)
        head = [tokenizer.bos_id] if bos else []
        ids = head + encoding.ids
        scored = [False] * len(head) + [any(start < b and a < end for a, b in spans) for start, end in
                                        encoding.offsets]
        if len(ids) > max_len + 1:
            cut += 1
            ids, scored = ids[-(max_len + 1):], scored[-(max_len + 1):]
        inputs.append(ids[:-1])
        targets.append([t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], scored[1:], strict=True)])
    return Examples(inputs, targets=targets, truncated=cut)


def pack(examples: Examples, max_len: int) -> Examples:
    """Consecutive examples joined into rows of at most ``max_len`` tokens (each keeps its own targets; later ones
    attend to earlier ones, as packing in trl does): fewer, fuller rows for short conversations."""
    inputs: list[list[int]] = []
    targets: list[list[int]] = []
    for x, y in zip(examples.inputs, examples.targets or [], strict=True):
        if inputs and len(inputs[-1]) + len(x) <= max_len:
            inputs[-1] = inputs[-1] + x
            targets[-1] = targets[-1] + y
        else:
            inputs.append(list(x))
            targets.append(list(y))
    return Examples(inputs, targets=targets, truncated=examples.truncated)
