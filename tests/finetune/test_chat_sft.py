"""Multi-turn supervised fine-tuning for chat: {"messages": [...]} data, the loss on assistant turns only (checked
token by token), ChatML's role tokens added to a pre-trained vocabulary, packing, and the run's chat template as
the server, the engine and transformers' apply_chat_template read it."""

from __future__ import annotations

import io
import json
import os
import pty
import random
import select
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from glmlab.data.dataset import IGNORE_INDEX
from glmlab.data.tokenizer import CHAT_TOKENS, Tokenizer
from glmlab.errors import GlmlabError
from glmlab.finetune.conversations import Conversation, encode_conversations, pack
from glmlab.finetune.run import finetune, resolve_finetune_config
from glmlab.finetune.tasks import FinetuneOptions, FinetuneTask
from glmlab.generation.chat import CHAT_STOPS, CHATML_TEMPLATE, PLAIN_TEMPLATE, TEMPLATE_FILE, ChatTemplate, render_chat
from glmlab.generation.generate import generate_batch
from glmlab.generation.settings import GenerationSettings
from glmlab.interop.hf_gpt2 import export_hf
from glmlab.runs import load_run
from tests.finetune.conftest import WORDS

pytestmark = pytest.mark.usefixtures("one_thread")


def write_conversations(path: Path, n: int, seed: int, words: list[str] = WORDS, turns: int = 2) -> Path:
    """Conversations of one or two exchanges: the assistant repeats the word it is asked for, then says bye (at
    most 64 characters in ChatML: the tiny model's context)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = rng.choice([w for w in words if len(w) <= 5])
        messages = [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}"}]
        if turns == 2:
            messages += [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "bye"}]
        rows.append({"messages": messages})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return write_conversations(tmp_path_factory.mktemp("chat") / "chats.jsonl", 80, 0)


def task_for(pretrained: Path, data: Path, **options) -> FinetuneTask:
    opts = FinetuneOptions(task="sft", init=str(pretrained), train=str(data), **options)
    config, init_raw = resolve_finetune_config(opts, {}, [])
    task = FinetuneTask(opts, config, init_raw)
    task.check(config)
    return task


def test_only_assistant_turns_and_their_end_token_are_scored(pretrained, chats):
    task = task_for(pretrained, chats)
    tok = task.tokenizer
    start, end = (tok.hf.token_to_id(t) for t in CHAT_TOKENS)
    base = load_run(pretrained).tokenizer.vocab_size
    assert (start, end) == (base, base + 1) and task.added_tokens == 2  # after the pre-trained vocabulary
    assert task.stop_token_ids == [end]
    first = [{"role": "system", "content": "echo"}, *json.loads(chats.read_text().splitlines()[0])["messages"]]
    examples = encode_conversations(tok, ChatTemplate(CHATML_TEMPLATE, tok), [Conversation(first)], 512, False)
    x, y = examples.inputs[0], examples.targets[0]
    full = tok.encode(ChatTemplate(CHATML_TEMPLATE, tok).render(first, add_generation_prompt=False))
    assert x == full[:-1]
    scored = [t for t in y if t != IGNORE_INDEX]
    expected = [t for m in first if m["role"] == "assistant" for t in tok.encode(m["content"]) + [end]]
    assert scored == expected  # each reply's characters and its <|im_end|>, nothing of the system or user turns
    positions = [i for i, t in enumerate(y) if t != IGNORE_INDEX]
    opening = tok.encode("<|im_start|>assistant\n")
    assert x[positions[0] - len(opening) + 1: positions[0] + 1] == opening  # the first scored token follows it


def test_packing_joins_examples_and_keeps_each_ones_targets(pretrained, tmp_path):
    short = write_conversations(tmp_path / "short.jsonl", 40, 1, words=["a", "of", "to", "my"], turns=1)
    task = task_for(pretrained, short)
    examples = task.splits["train"]
    packed = pack(examples, 64)
    assert len(packed) <= (len(examples) + 1) // 2  # two ~28-token conversations fit one 64-token row
    assert sum(len(x) for x in packed.inputs) == sum(len(x) for x in examples.inputs)
    assert [t for y in packed.targets for t in y] == [t for y in examples.targets for t in y]
    assert max(len(x) for x in packed.inputs) <= 64
    packed_task = task_for(pretrained, short, pack=True)
    assert len(packed_task.splits["train"]) == len(packed) and len(packed_task.splits["val"]) == \
        len(task.splits["val"])  # validation stays one conversation per row


@pytest.fixture(scope="module")
def chat_run(pretrained, chats, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("chat-run") / "chat"
    options = FinetuneOptions(task="sft", init=str(pretrained), train=str(chats), eval_samples=8)
    _, results = finetune(options, out, overrides=["train.max_steps=150", "train.eval_interval=50",
                                                   "train.threads=1", "train.lr=3e-3"], show_progress=False)
    return out, results


def test_chat_finetune_grows_the_vocabulary_and_the_run_chats_in_chatml(pretrained, chat_run, tmp_path):
    out, results = chat_run
    assert results["val"]["loss"] < results["before"]["val"]["loss"] - 0.5
    assert (out / TEMPLATE_FILE).read_text() == CHATML_TEMPLATE
    run, source = load_run(out), load_run(pretrained)
    assert run.model.vocab_size == source.model.vocab_size + 2
    old_rows = run.model.transformer.wte.weight[: source.model.vocab_size]
    assert old_rows.shape == source.model.transformer.wte.weight.shape
    template = run.chat_template
    assert template.end_tokens == ["<|im_end|>"] and template.stops == []
    messages = [{"role": "user", "content": "say moon"}, {"role": "assistant", "content": "moon moon"},
                {"role": "user", "content": "ok"}]
    prompt = template.render(messages)
    assert prompt == ("<|im_start|>user\nsay moon<|im_end|>\n<|im_start|>assistant\nmoon moon<|im_end|>\n"
                      "<|im_start|>user\nok<|im_end|>\n<|im_start|>assistant\n")
    settings = GenerationSettings(max_new_tokens=20, temperature=0, stop_token_ids=template.end_ids,
                                  logprobs=0)
    [reply] = generate_batch(run.model, run.tokenizer, [prompt], settings)[0]
    assert reply.finish_reason == "stop" and reply.ended_at_eos and "<|im_end|>" not in reply.text
    assert reply.text == "bye"  # learnt, and stopped at the end of its turn

    # what the server answers: the same prompt, the same reply, ended by <|im_end|>
    from glmlab.serve.app import create_app
    from tests.serve.conftest import OPTIONS, LiveServer

    with LiveServer(create_app(run, OPTIONS)) as server:
        answer = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": messages,
                                                                       "temperature": 0, "max_tokens": 20}).json()
        info = httpx.get(server.url + "/tokenizer_info").json()
    assert answer["choices"][0]["message"]["content"] == "bye" and answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"]["prompt_tokens"] == len(run.tokenizer.encode(prompt))
    assert info["chat_template"] == CHATML_TEMPLATE

    # transformers renders the export's template as glmlab does, token for token
    transformers = pytest.importorskip("transformers")
    export_hf(out, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == prompt
    assert hf_tok(prompt, add_special_tokens=False)["input_ids"] == run.tokenizer.encode(prompt)


def test_template_refusals(pretrained, chats, tmp_path):
    tok = load_run(pretrained).tokenizer
    with pytest.raises(GlmlabError, match="does not compile"):
        ChatTemplate("{% for m in messages %}", tok)
    failing = ChatTemplate("{{ raise_exception('only user turns') }}", tok)
    with pytest.raises(GlmlabError, match="only user turns"):
        failing.render([{"role": "user", "content": "hi"}])
    unstable = ChatTemplate("{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}", tok)
    with pytest.raises(GlmlabError, match="differently once more messages follow"):
        unstable.assistant_spans([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    bad_role = tmp_path / "role.jsonl"
    bad_role.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(GlmlabError, match="role 'robot'"):
        task_for(pretrained, bad_role)
    no_reply = tmp_path / "noreply.jsonl"
    no_reply.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n" * 2)
    with pytest.raises(GlmlabError, match="no assistant turn"):
        task_for(pretrained, no_reply)
    with pytest.raises(GlmlabError, match="does not exist"):
        task_for(pretrained, chats, chat_template=str(tmp_path / "missing.jinja"))


def test_plain_template_is_the_python_rendering():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "More"}]
    assert ChatTemplate(PLAIN_TEMPLATE).render(messages) == render_chat(messages)
    assert ChatTemplate(PLAIN_TEMPLATE).stops == CHAT_STOPS


def read_until(fd: int, marker: str, timeout: float = 60.0) -> str:
    """What a pseudo-terminal shows until ``marker`` appears."""
    seen, deadline = b"", time.monotonic() + timeout
    while marker.encode() not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            shown = seen.decode(errors="replace")
            raise AssertionError(f"no {marker!r} within {timeout}s; the terminal showed {shown!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        seen += chunk
    return seen.decode(errors="replace")


def test_glmlab_chat_in_a_terminal(chat_run):
    """An interactive session through a pseudo-terminal: the prompt, a streamed reply that stops at the end of its
    turn, /system, /reset, an unknown command, and Ctrl-D."""
    out, _ = chat_run
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "glmlab", "chat", str(out), "--temperature", "0",
                             "--max-new-tokens", "4"], stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    try:
        assert "the run's chat template" in read_until(master, "you> ")
        os.write(master, b"say moon\r")
        read_until(master, "you> ")
        os.write(master, b"ok\r")
        shown = read_until(master, "you> ")
        assert "assistant> bye" in shown and "<|im_end|>" not in shown
        os.write(master, b"/system be brief\r")
        assert "[system prompt set]" in read_until(master, "you> ")
        os.write(master, b"/reset\r")
        assert "[conversation cleared]" in read_until(master, "you> ")
        os.write(master, b"/nope\r")
        assert "unknown command /nope" in read_until(master, "you> ")
        os.write(master, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        os.close(master)


def test_conversation_keeps_history_and_drops_the_oldest_turns_to_fit(chat_run):
    from glmlab.chat_cli import Conversation

    run = load_run(chat_run[0])
    chat = Conversation(run, None, {"max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                                    "repetition_penalty": 1.0, "seed": 0})
    sink = io.StringIO()
    first = chat.reply("ok", sink)
    assert first and sink.getvalue() == first + "\n"  # streamed as written, its end token not shown
    chat.messages.append({"role": "user", "content": "ok"})
    ids, dropped = chat.prompt()  # the next prompt holds the first exchange
    assert dropped == 0 and run.tokenizer.decode(ids, skip_special_tokens=False) == (
        f"<|im_start|>user\nok<|im_end|>\n<|im_start|>assistant\n{first}<|im_end|>\n<|im_start|>user\nok<|im_end|>\n"
        "<|im_start|>assistant\n")
    chat.messages.pop()
    chat.system = "echo"
    for _ in range(3):  # the 64-token context fills: the oldest exchange gives way, the system prompt stays
        chat.reply("ok", sink)
    assert "oldest messages no longer fit" in sink.getvalue()
    ids, _ = chat.prompt()
    assert run.tokenizer.decode(ids, skip_special_tokens=False).startswith("<|im_start|>system\necho<|im_end|>")
    assert chat.messages[0]["role"] == "user" and len(chat.messages) < 8
    before = list(chat.messages)
    with pytest.raises(GlmlabError, match="longer than the context"):
        chat.reply("x" * 200, sink)
    assert chat.messages == before  # the refused message left no trace


def test_prepare_for_chat_adds_the_role_tokens_and_its_runs_carry_chatml(shakespeare_excerpt, tmp_path):
    from glmlab.data.prepare import prepare
    from glmlab.training.trainer import train
    from tests.conftest import tiny_config

    meta = prepare([shakespeare_excerpt], tmp_path / "data", tokenizer="char", chat=True)
    tok = Tokenizer.from_file(tmp_path / "data" / "tokenizer.json")
    assert [tok.hf.token_to_id(t) for t in CHAT_TOKENS] == [meta["vocab_size"] - 2, meta["vocab_size"] - 1]
    assert tok.encode("<|im_start|>user") == [meta["vocab_size"] - 2, *tok.encode("user")]
    train(tiny_config("train.max_steps=2", "train.sample_tokens=0"), tmp_path / "data", tmp_path / "run",
          show_progress=False)
    assert (tmp_path / "run" / TEMPLATE_FILE).read_text() == CHATML_TEMPLATE
    assert load_run(tmp_path / "run").chat_template.end_tokens == ["<|im_end|>"]
