"""Prompt tokens: the chat template, the cut to `data.max_prompt_tokens`, the fit check, and the EOS ids.

`TextFormat` is the one decision per run about how text becomes tokens and back: the tokenizer, whether the
chat template wraps prompts, the prompt cut, the EOS set (the template's end-of-turn token included) and the
stop strings. Every decoder, the fine-tune's reference perplexity and the suite's baselines read the same one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from raftlib.records import FinishReason, Prompt

logger = logging.getLogger(__name__)


class GenerationError(ValueError):
    """A prompt or tokenizer cannot be used for generation; the message says which and why."""


def uses_chat_template(tokenizer, mode: str) -> bool:
    """Whether prompts are wrapped in the tokenizer's chat template (`generation.chat_template`)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "always" and not has_template:
        raise GenerationError(
            "generation.chat_template = 'always' but the tokenizer has no chat template; "
            "set generation.chat_template=never or use a tokenizer that ships one"
        )
    return mode == "always" or (mode == "auto" and has_template)


def encode_prompts(
    tokenizer, prompts: Sequence[Prompt], *, chat_template: str = "auto", max_prompt_tokens: int | None = None
) -> list[list[int]]:
    """Token ids per prompt: the chat template when asked, then only the last `max_prompt_tokens` kept (the end is
    what the completion continues; a leading BOS stays first). Whether a prompt fits the model is
    `TextFormat.fitting`'s question."""
    templated = uses_chat_template(tokenizer, chat_template)
    encoded = []
    for prompt in prompts:
        if templated:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt.text}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt.text)["input_ids"]
        if not ids:
            raise GenerationError(f"prompt {prompt.prompt_id} encodes to no tokens: {prompt.text!r}")
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            # keep the start-of-text token a tokenizer adds (Llama's <s>): the model was trained with it first
            bos = [ids[0]] if tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id else []
            ids = bos + ids[len(ids) - max_prompt_tokens + len(bos) :]
        encoded.append(list(ids))
    return encoded


def context_window(model) -> int | None:
    """Positions the model can attend over (`model` a model or its config), or None when the config has none."""
    config = getattr(model, "config", model)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def eos_token_ids(model, tokenizer) -> set[int]:
    """The tokenizer's EOS and the generation config's (`model` a model or its GenerationConfig)."""
    generation = getattr(model, "generation_config", model)
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(generation, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids


def end_of_turn_ids(tokenizer) -> set[int]:
    """The special tokens the chat template writes right after an assistant message (ChatML's `<|im_end|>`,
    Llama 3's `<|eot_id|>`): a templated completion ends with one of them, so it must count as an EOS."""
    if not getattr(tokenizer, "chat_template", None):
        return set()
    marker = "RAFTLIB_END_OF_TURN_PROBE"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # a template that cannot render an assistant turn has no end-of-turn token to find
        return set()
    if marker not in text:
        return set()
    after = tokenizer(text.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {
        i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(token, "special", False)
    }
    return {next(i for i in after if i in special)} if any(i in special for i in after) else set()


@dataclass(frozen=True, eq=False)
class TextFormat:
    """How one run's text becomes tokens and back (see the module docstring)."""

    tokenizer: Any
    chat_template: str = "auto"
    """generation.chat_template: auto (when the tokenizer has one), always, never."""
    max_prompt_tokens: int | None = None
    """data.max_prompt_tokens: keep only the last this-many prompt tokens."""
    eos_ids: frozenset[int] = frozenset()
    """Ids that end a completion: the tokenizer's and model's EOS, plus the template's end-of-turn token."""
    stop_strings: tuple[str, ...] = ()

    @classmethod
    def of(cls, tokenizer, model, generation, max_prompt_tokens: int | None = None) -> TextFormat:
        """The run's format: `generation` is a GenerationSection, `model` the policy or its GenerationConfig (EOS)."""
        eos = eos_token_ids(model, tokenizer)
        templated = uses_chat_template(tokenizer, generation.chat_template)
        if templated:
            eos |= end_of_turn_ids(tokenizer)
        if not eos:
            raise GenerationError("the tokenizer has no EOS token; completions could never end on their own")
        return cls(
            tokenizer, generation.chat_template, max_prompt_tokens, frozenset(eos), tuple(generation.stop_strings)
        )

    @property
    def eos_id(self) -> int:
        """The EOS a written completion ends with: the tokenizer's own."""
        return self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else min(self.eos_ids)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @property
    def templated(self) -> bool:
        return uses_chat_template(self.tokenizer, self.chat_template)

    def encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Token ids per prompt (template applied, cut to max_prompt_tokens)."""
        return encode_prompts(
            self.tokenizer, prompts, chat_template=self.chat_template, max_prompt_tokens=self.max_prompt_tokens
        )

    def completion_ids(self, text: str) -> list[int]:
        """A written completion (a reference, a teacher's) as the tokens a model would emit, ending in an EOS."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_id]

    def completion_text(self, ids: Sequence[int], reason: FinishReason) -> str:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        if reason == "stop":
            from raftlib.text.sampling import cut_at_stop

            text = cut_at_stop(text, self.stop_strings)
        return text

    def fitting(self, prompts: Sequence[Prompt], max_new_tokens: int, window: int | None, what: str):
        """The prompts whose encoding plus `max_new_tokens` fits the model's context `window`, their ids by
        prompt id, and how many were dropped (logged with an example; dropped when the data is prepared, never
        mid-run)."""
        ids = self.encode(prompts)
        keep, by_id, dropped = [], {}, []
        for prompt, prompt_ids in zip(prompts, ids, strict=True):
            if window is not None and len(prompt_ids) + max_new_tokens > window:
                dropped.append((prompt, len(prompt_ids)))
                continue
            keep.append(prompt)
            by_id[prompt.prompt_id] = prompt_ids
        if dropped:
            prompt, length = dropped[0]
            logger.warning(
                "%s: dropped %d of %d prompts longer than the context window %d minus max_new_tokens %d "
                "(e.g. prompt %d, %d tokens); set data.max_prompt_tokens to cut them instead",
                *(what, len(dropped), len(prompts), window, max_new_tokens, prompt.prompt_id, length),
            )
        return keep, by_id, len(dropped)
