"""The decoder registry: `generation.backend` names one of `DECODERS` (records and protocol: `raftlib.text.decoding`).

    decoder = build_decoder(DecoderSpec(policy, config, text_format, rows=64, prompt_width=32))

A separate module so the decoders import `raftlib.text.decoding` and this table imports them, with no circle.
"""

from __future__ import annotations

from collections.abc import Callable

from raftlib.text.decoding import Decoder, DecoderSpec


def _eager(spec: DecoderSpec) -> Decoder:
    from raftlib.text.eager import EagerDecoder

    return EagerDecoder(spec.policy, spec.decoding)


def _static(spec: DecoderSpec) -> Decoder:
    from raftlib.text.fastgen import StaticDecoder

    return StaticDecoder.for_spec(spec)


def _vllm(spec: DecoderSpec) -> Decoder:
    from raftlib.text.vllm_backend import VLLMDecoder

    return VLLMDecoder.for_spec(spec)


DECODERS: dict[str, Callable[[DecoderSpec], Decoder]] = {"eager": _eager, "static": _static, "vllm": _vllm}
"""`generation.backend` -> a factory of that decoder. Add an entry to plug in another engine."""


def build_decoder(spec: DecoderSpec) -> Decoder:
    """The decoder `spec.config.generation.backend` names."""
    name = spec.config.generation.backend
    if name not in DECODERS:
        raise KeyError(f"generation.backend = {name!r}: no such decoder (known: {', '.join(sorted(DECODERS))})")
    return DECODERS[name](spec)
