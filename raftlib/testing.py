"""Tiny models built in code, for tests and the toy example: nothing is downloaded.

A byte-level BPE tokenizer trained offline on a small generated corpus, and randomly initialised
GPT-2 / Llama causal LMs (and a GPT-2 sequence-classification reward model) of about 100k weights,
saved as Hugging Face dirs with safetensors. Use them to test your own rewards and configs:

    from raftlib.testing import build_gpt2, write_prompts
    model_dir = build_gpt2(tmp_path / "model"); prompts = write_prompts(tmp_path / "prompts.jsonl")
"""

from __future__ import annotations

import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_WORDS = (
    "the a cat dog sat on mat sun rain happy sad good bad day night red blue green apple tree river "
    "stone bright quiet loud small big warm cold and but so then very really quite always never"
).split()


def corpus(lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(lines)]


def build_tokenizer(directory: Path, *, vocab_size: int = 320, chat_template: bool = False, pad_token: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|pad|>"] if pad_token else ["<|endoftext|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|pad|>" if pad_token else None,
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    return fast


def build_gpt2(
    directory: Path, *, seed: int = 0, chat_template: bool = False, pad_token: bool = False, heads: int = 2
) -> Path:
    """A random GPT-2 of width 48. vLLM's CPU attention serves head sizes 32, 48, 64..., not 24: `heads=1`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer(directory, chat_template=chat_template, pad_token=pad_token)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=48,
        n_layer=2,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(directory, safe_serialization=True)
    return directory


CHATML_TEMPLATE = (  # Qwen2.5's base-model template, shortened to what a plain user/assistant exchange renders
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_qwen2(directory: Path, *, seed: int = 0) -> Path:
    """A random Qwen2 shaped like Qwen2.5's base models: a ChatML chat template whose turns end in `<|im_end|>`,
    while the tokenizer's and the generation config's EOS is `<|endoftext|>` alone (as Qwen2.5 ships them)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(fast),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=fast.eos_token_id,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    GenerationConfig(eos_token_id=fast.eos_token_id).save_pretrained(directory)
    return directory


def build_llama(
    directory: Path, *, seed: int = 0, chat_template: bool = True, heads: int = 4, kv_heads: int = 2
) -> Path:
    """A random Llama of width 48 (grouped-query attention by default; `heads=1, kv_heads=1` for vLLM's CPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(directory, chat_template=chat_template)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return directory


def build_gpt2_reward_model(directory: Path, *, seed: int = 0, num_labels: int = 1) -> Path:
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tokenizer = build_tokenizer(directory)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=32,
        n_layer=1,
        n_head=2,
        num_labels=num_labels,
        pad_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2ForSequenceClassification(config).save_pretrained(directory, safe_serialization=True)
    return directory


def write_prompts(path: Path, count: int = 40, seed: int = 1) -> Path:
    import json

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(count):
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 5)))
            handle.write(json.dumps({"prompt": f"{words}", "answer": str(i % 7), "reference": "the sun sat."}) + "\n")
    return path
