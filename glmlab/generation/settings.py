"""Decoding settings: one dataclass for every control, validated with messages that name the bad value."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from glmlab.errors import GlmlabError
from glmlab.generation.grammar import Grammar

MAX_NUM_SEQUENCES = 1024
MAX_LOGPROBS = 20


@dataclass
class GenerationSettings:
    """Decoding controls, named as in Hugging Face ``GenerationConfig`` where they overlap.

    With ``num_beams > 1`` decoding is deterministic beam search: the sampling filters do not apply,
    stop strings cut the finished hypotheses afterwards, and logprobs / max_time are refused.
    ``presence_penalty`` / ``frequency_penalty`` follow OpenAI (over generated tokens);
    ``repetition_penalty`` follows Hugging Face (over prompt and generated tokens).
    ``logprobs=N`` returns, per generated token, its log-probability under the model and the N most
    likely alternatives (from the raw model distribution, before any filter).
    """

    max_new_tokens: int = 200
    min_new_tokens: int = 0  # EOS is suppressed until this many tokens are generated
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    typical_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0  # 0 = off
    bad_words: list[str] = field(default_factory=list)  # texts that must not be generated
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (-100..100)
    stop: list[str] = field(default_factory=list)  # stop strings; the stop text is not returned
    stop_at_eos: bool = True
    stop_token_ids: list[int] = field(default_factory=list)  # tokens that end a row as <eos> does (a chat
    # template's end of turn, <|im_end|>): not output, logprob kept; they end it even when <eos> is ignored
    num_return_sequences: int = 1
    num_beams: int = 1
    length_penalty: float = 1.0  # beam score = sum of log-probs / generated length ** length_penalty
    early_stopping: bool | str = False  # beam search: True, False or "never", as in Hugging Face
    logprobs: int | None = None  # None = off; N = the chosen token's log-prob and N alternatives
    seed: int | None = None  # the same seed gives the same text, whatever else is in the batch
    max_time: float | None = None  # seconds; generation stops (finish_reason "time") when it runs out
    # A chat reply: its leading whitespace is dropped before stop strings apply, and its logprobs are those
    # of the tokens its text shows (not the dropped whitespace, a stop string or the closing <eos>).
    chat_reply: bool = False
    grammar: Grammar | None = None  # structured output: JSON (any object, or a schema) or a GBNF grammar

    def validate(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be at least 1"),
            (0 <= self.min_new_tokens <= self.max_new_tokens,
             f"min_new_tokens={self.min_new_tokens} must be between 0 and max_new_tokens={self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature={self.temperature} must be >= 0 (0 = greedy)"),
            (self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 = off)"),
            (0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]"),
            (0 <= self.min_p <= 1, f"min_p={self.min_p} must be in [0, 1]"),
            (0 < self.typical_p <= 1, f"typical_p={self.typical_p} must be in (0, 1]"),
            (self.repetition_penalty > 0, f"repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty={self.presence_penalty} must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty={self.frequency_penalty} must be in [-2, 2]"),
            (self.no_repeat_ngram_size >= 0, f"no_repeat_ngram_size={self.no_repeat_ngram_size} must be >= 0"),
            (1 <= self.num_return_sequences <= MAX_NUM_SEQUENCES,
             f"num_return_sequences={self.num_return_sequences} must be in 1..{MAX_NUM_SEQUENCES}"),
            (1 <= self.num_beams <= MAX_NUM_SEQUENCES, f"num_beams={self.num_beams} must be in 1..{MAX_NUM_SEQUENCES}"),
            (self.num_beams == 1 or self.num_return_sequences <= self.num_beams,
             f"num_return_sequences={self.num_return_sequences} cannot exceed num_beams={self.num_beams}"),
            (self.early_stopping in (True, False, "never"), f"early_stopping={self.early_stopping!r} must be "
             "true, false or 'never'"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"logprobs={self.logprobs} must be between 0 and {MAX_LOGPROBS}"),
            (self.max_time is None or self.max_time > 0, f"max_time={self.max_time} must be positive"),
            (math.isfinite(self.length_penalty), f"length_penalty={self.length_penalty} must be a finite number"),
            (self.seed is None or 0 <= self.seed < 2**63, f"seed={self.seed} must be between 0 and 2**63 - 1"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty text"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             f"stop_token_ids={self.stop_token_ids} must be token ids"),
            (self.num_beams == 1 or (self.logprobs is None and self.max_time is None and self.grammar is None),
             "beam search returns no logprobs and takes no max_time or grammar; use num_beams=1 for those"),
            (all(isinstance(s, str) and s for s in self.bad_words), "bad_words must be non-empty text"),
            (all(isinstance(t, int) and t >= 0 and -100 <= b <= 100 for t, b in self.logit_bias.items()),
             "logit_bias maps token ids (>= 0) to biases between -100 and 100"),
        ]
        for ok, problem in checks:
            if not ok:
                raise GlmlabError(f"invalid sampling setting: {problem}", "change the value and try again")
