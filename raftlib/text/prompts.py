"""Prompt tokens: the chat template, the cut to `data.max_prompt_tokens`, the fit check, and the EOS ids.

Shared by every text decoder (eager, static, vLLM) and by the fine-tune's reference perplexity.
"""

from __future__ import annotations

from collections.abc import Sequence

from raftlib.records import Prompt


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
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    chat_template: str = "auto",
    max_prompt_tokens: int | None = None,
    max_new_tokens: int = 0,
    context_window: int | None = None,
) -> list[list[int]]:
    """Token ids per prompt: chat template when asked, keep the last `max_prompt_tokens`, check fit."""
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
            ids = ids[-max_prompt_tokens:]  # keep the end: it is what the completion continues
        if context_window is not None and len(ids) + max_new_tokens > context_window:
            raise GenerationError(
                f"prompt {prompt.prompt_id} has {len(ids)} tokens; with generation.max_new_tokens = "
                f"{max_new_tokens} that exceeds the model's context window of {context_window}. "
                "Set data.max_prompt_tokens or lower max_new_tokens."
            )
        encoded.append(list(ids))
    return encoded


def context_window(model) -> int | None:
    config = model.config
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def eos_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids
