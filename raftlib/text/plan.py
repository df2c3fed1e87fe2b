"""The planner for language-model runs: each stage's peak memory per process and time per iteration, estimated.

Stages, in the order a RAFT iteration runs them: generate (K completions per prompt, sharded by batch), score
(a Hugging Face reward model, when the reward uses one), the KL reference (selection.kl_coef > 0: the main
process alone), the fine-tune under DDP and under FSDP (the strategy not chosen shown for comparison) and the
evaluation. `TextSizes` holds what every stage reads (token counts, bytes per weight, peaks, the shared terms);
one function per stage turns it into a `StageEstimate` whose terms carry their arithmetic (docs/scale.md has
the formulas). The shared primitives and the assumptions live in raftlib.estimates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from raftlib.estimates import (
    ASSUMPTIONS,
    BANDWIDTH_EFFICIENCY,
    BYTES_PER_ELEMENT,
    DISK_BYTES_PER_S,
    FORWARD_MFU,
    KNOWN_SHAPES,
    PROMPT_TOKENS_DEFAULT,
    RUNTIME_OVERHEAD_BYTES,
    STEP_OVERHEAD_S_PER_LAYER,
    TRAIN_MFU,
    USABLE_FRACTION,
    VLLM_KV_MARGIN,
    VLLM_KV_MAX_SHARE,
    GiB,
    Hardware,
    ModelShape,
    Plan,
    StageEstimate,
    Term,
    model_shape,
    read_model_config,
    vllm_kv_cache_bytes,
)

if TYPE_CHECKING:
    from raftlib.text.config import RAFTConfig

__all__ = ["TextSizes", "activation_elements_per_token", "plan_text", "reward_model_path", "text_sizes"]


def reward_model_path(config: RAFTConfig) -> tuple[str | None, str]:
    """The first reward component that is a Hugging Face reward model: (path, dtype).

    The built-in `reward_model`, or any reward factory whose `path` argument names a model (a dir with a
    config.json, or a hub id of KNOWN_SHAPES), e.g. the suite's `raftsuite.hh_paper:formatted_reward_model`.
    """
    for component in config.reward.components:
        path = component.args.get("path")
        if path is None:
            continue
        is_model = Path(str(path), "config.json").is_file() or str(path) in KNOWN_SHAPES
        if component.fn == "reward_model" or is_model:
            return str(path), str(component.args.get("dtype", "float32"))
    return None, "float32"


def activation_elements_per_token(shape: ModelShape) -> int:
    """Tensors one decoder layer saves for the backward pass, per token (see docs/scale.md):
    2 norms x (input + output) = 4d; q and attention output 2d; k and v 2 kv; MLP: gated 4f
    (gate, silu(gate), up, their product), plain 2f (up, activation)."""
    mlp = 4 if shape.gated_mlp else 2
    return 6 * shape.hidden + 2 * shape.kv_dim + mlp * shape.intermediate


@dataclass(frozen=True)
class TextSizes:
    """What the stage estimates share: the config, the shapes, the sizes in docs/scale.md's letters, the peaks."""

    config: RAFTConfig
    hw: Hardware
    policy: ModelShape
    reward: ModelShape | None
    """The reward model's shape; None when no reward component is a Hugging Face model."""
    rm_dtype: str
    P: int
    """Processes (one per GPU)."""
    Lp: int
    """Prompt tokens."""
    G: int
    """Completion tokens (max_new_tokens)."""
    S: int
    """Tokens per sample, Lp + G."""
    wb: int
    """Bytes per weight of the policy (model.dtype)."""
    N: int
    """Policy parameters."""
    L: int
    """Policy layers."""
    kv_per_token: int
    """KV-cache bytes per token: 2 x L x kv x wb."""
    bf16_compute: bool
    """The fine-tune computes in 16 bits (autocast, or 16-bit weights)."""
    peak: float
    """FLOP/s per GPU for the policy's fine-tune."""
    gen_peak: float
    """FLOP/s per GPU for generation and log-probs: the weights' dtype (no autocast there)."""
    bw: float
    """Usable memory bandwidth per GPU, bytes/s."""
    memory_limit: float
    """The bytes a stage may use and still fit."""
    overhead: Term
    weights: Term
    reference_weights: Term
    lp_memory: Term
    """The log-prob logits of the KL reference (selection and evaluation)."""
    engine: tuple[Term, ...]
    """A vLLM engine's own weights and KV pool, resident in every stage (built once per run, no sleep mode);
    empty for the eager and static decoders, which decode with the policy's weights."""


def text_sizes(
    config: RAFTConfig,
    hw: Hardware,
    policy: ModelShape,
    reward: ModelShape | None,
    rm_dtype: str,
    prompt_tokens: int | None,
) -> TextSizes:
    """The sizes and shared terms every stage estimate reads."""
    t, d = config.training, config.data
    Lp = prompt_tokens or d.max_prompt_tokens or PROMPT_TOKENS_DEFAULT
    G = config.generation.max_new_tokens
    S = Lp + G  # tokens per sample
    wb = BYTES_PER_ELEMENT[config.model.dtype]
    N, L = policy.params, policy.layers
    bf16_compute = t.mixed_precision != "no" or wb == 2
    lora = config.model.lora
    lp_batch = 16  # completion_logprobs' batch
    return TextSizes(
        config=config,
        hw=hw,
        policy=policy,
        reward=reward,
        rm_dtype=rm_dtype,
        P=hw.gpus,
        Lp=Lp,
        G=G,
        S=S,
        wb=wb,
        N=N,
        L=L,
        kv_per_token=2 * L * policy.kv_dim * wb,
        bf16_compute=bf16_compute,
        peak=(hw.gpu_tflops if bf16_compute else hw.fp32_peak) * 1e12,
        gen_peak=(hw.gpu_tflops if wb == 2 else hw.fp32_peak) * 1e12,
        bw=hw.gpu_bandwidth_gbps * 1e9 * BANDWIDTH_EFFICIENCY,
        memory_limit=hw.gpu_memory_gib * GiB * USABLE_FRACTION,
        overhead=Term("runtime", RUNTIME_OVERHEAD_BYTES, "CUDA context + allocator slack (assumed)"),
        weights=Term("policy weights", N * wb, f"N x {wb} B = {N:,} x {wb}"),
        reference_weights=Term(
            "reference weights", 0 if lora else N * wb, "LoRA: adapter disabled, 0" if lora else f"N x {wb} B"
        ),
        lp_memory=Term(
            "log-prob logits",
            lp_batch * S * policy.vocab * 4 * 2,
            f"16 x S x V x 4 B x 2 = 16 x {S} x {policy.vocab} x 8",
        ),
        engine=_vllm_engine(config, hw, N * wb, S, 2 * L * policy.kv_dim * wb),
    )


def _vllm_engine(config: RAFTConfig, hw: Hardware, weight_bytes: int, S: int, kv_per_token: int) -> tuple[Term, ...]:
    """What a vLLM engine holds beside the policy: its copy of the weights, and the KV pool raftlib gives it
    (`vllm_kv_cache_bytes` for the rows the run's decoder is built with, as `engine_options` does), or vLLM's own
    share of the device when `generation.vllm_options` sets `gpu_memory_utilization`."""
    g = config.generation
    if g.backend != "vllm":
        return ()
    weights = Term("vLLM weights", weight_bytes, "the engine's own copy: N x wb")
    # vLLM sizes the pool by kv_cache_memory_bytes when it is given, whatever gpu_memory_utilization says.
    if "kv_cache_memory_bytes" in g.vllm_options:  # the user sized the pool
        pool = int(g.vllm_options["kv_cache_memory_bytes"])
        return weights, Term("vLLM KV pool", pool, "vllm_options.kv_cache_memory_bytes (user's)")
    if "gpu_memory_utilization" in g.vllm_options:
        share = float(g.vllm_options["gpu_memory_utilization"])
        pool = max(0.0, hw.gpu_memory_gib * GiB * share - weight_bytes)
        return weights, Term("vLLM KV pool", pool, f"gpu_memory_utilization {share} x GPU - weights (user's share)")
    rows = max(g.prompts_per_batch * g.samples_per_prompt, config.loop.eval_samples_per_prompt)
    need = vllm_kv_cache_bytes(rows, S, kv_per_token)
    pool = vllm_kv_cache_bytes(rows, S, kv_per_token, hw.gpu_memory_gib * GiB)
    how = f"rows x S x kv/token x {VLLM_KV_MARGIN} = {rows} x {S} x {kv_per_token} x {VLLM_KV_MARGIN}"
    if pool < need:
        how = f"{VLLM_KV_MAX_SHARE:g} x GPU, below {how} = {need / GiB:.1f} GiB (vLLM schedules the rest in turn)"
    return weights, Term("vLLM KV pool", pool, how)


def _vllm_warnings(z: TextSizes) -> list[str]:
    """A warning when raftlib's capped pool holds fewer rows at full length than one batch draws (a pool the
    user sized through `vllm_options` is theirs, and the warning's advice would not apply)."""
    user = z.config.generation.vllm_options
    if not z.engine or "gpu_memory_utilization" in user or "kv_cache_memory_bytes" in user:
        return []
    g = z.config.generation
    rows = max(g.prompts_per_batch * g.samples_per_prompt, z.config.loop.eval_samples_per_prompt)
    at_once = int(z.engine[1].value // (z.S * z.kv_per_token * VLLM_KV_MARGIN))
    if at_once >= rows:
        return []
    return [
        f"vLLM's KV pool ({VLLM_KV_MAX_SHARE:g} of the GPU, {z.engine[1].value / GiB:.1f} GiB) holds about {at_once} of a "
        f"batch's {rows} rows at their full {z.S} tokens at once; vLLM schedules the rest in turn (shorter rows: more "
        "at once). Lower generation.prompts_per_batch, or set vllm_options.kv_cache_memory_bytes"
    ]


def plan_text(
    config: RAFTConfig,
    hw: Hardware,
    sharding: Literal["ddp", "fsdp"],
    model_config: str | None = None,
    reward_config: str | None = None,
    prompt_tokens: int | None = None,
) -> Plan:
    """Estimate every stage of one iteration of a language-model `config` on `hw` (see raftlib.plan.plan)."""
    raw, source = read_model_config(config.model.path, model_config)
    lora = config.model.lora
    policy = model_shape(raw, source, lora_targets=lora.target_modules if lora else None)
    models = {"policy": f"{policy.params / 1e9:.3f} B parameters from {source}"}
    rm_path, rm_dtype = reward_model_path(config)
    reward = None
    if rm_path:
        raw_rm, rm_source = read_model_config(rm_path, reward_config)
        reward = model_shape(raw_rm, rm_source, head="score")
        models["reward"] = f"{reward.params / 1e9:.3f} B parameters from {rm_source}"
    z = text_sizes(config, hw, policy, reward, rm_dtype, prompt_tokens)

    stages = [_generate(z)]
    warnings: list[str] = _vllm_warnings(z)
    if reward is not None:
        stages.append(_score(z, reward))
    if config.selection.kl_coef > 0:
        stage, warned = _kl_reference(z)
        stages.append(stage)
        warnings += warned
    stages += _fine_tunes(z, sharding)
    if config.data.eval_prompts:
        stage, warned = _evaluate(z)
        stages.append(stage)
        warnings += warned
    return Plan(hw, sharding, config.loop.iterations, tuple(stages), tuple(warnings), ASSUMPTIONS, models)


# -- generation: K samples for b prompts, sharded by batch over P processes ------------------------------


def _decode_seconds(z: TextSizes, prompts: int, samples_per_prompt: int, prefix: str) -> list[Term]:
    """Time to draw `samples_per_prompt` completions for `prompts` prompts, sharded over P processes."""
    g = z.config.generation
    ppb = g.prompts_per_batch
    rows_per_batch = ppb * samples_per_prompt
    batches = math.ceil(math.ceil(prompts / ppb) / z.P)
    per_step_bytes = z.N * z.wb + rows_per_batch * z.S * z.kv_per_token / 2  # the cache is half full on average
    per_step = max(per_step_bytes / z.bw, 2 * z.N * rows_per_batch / (z.gen_peak * FORWARD_MFU))
    host = STEP_OVERHEAD_S_PER_LAYER[g.backend] * z.L
    prefill = 2 * z.N * ppb * z.Lp / (z.gen_peak * FORWARD_MFU)
    return [
        Term(
            f"{prefix}decode",
            batches * z.G * (per_step + host),
            f"batches x G x (max(bytes/bw, FLOPs/peak) + host) = {batches} x {z.G} x ({per_step * 1e3:.1f} + {host * 1e3:.1f} ms)",
        ),
        Term(
            f"{prefix}prefill",
            batches * prefill,
            f"batches x 2N x prompts x Lp / (peak x MFU) = {batches} x {prefill:.3f} s",
        ),
    ]


def _generate(z: TextSizes) -> StageEstimate:
    g, policy, S, wb, N, Lp = z.config.generation, z.policy, z.S, z.wb, z.N, z.Lp
    K, ppb = g.samples_per_prompt, g.prompts_per_batch
    R = ppb * K
    if g.backend == "vllm":
        # The engine decodes from its own weights and pool (z.engine, below); the policy stays resident beside it.
        kv = Term("KV cache", 0, "inside vLLM's pool")
        logits = Term("prefill logits", 0, "inside vLLM's pool")
    else:
        kv = Term(
            "KV cache",
            R * S * z.kv_per_token,
            f"R x S x 2 x L x kv x {wb} B = {R} x {S} x 2 x {z.L} x {policy.kv_dim} x {wb}",
        )
        logits = Term(
            "prefill logits",
            ppb * Lp * policy.vocab * wb + 2 * R * policy.vocab * 4,
            f"prompts x Lp x V x {wb} B + 2 x R x V x 4 B (sampling) = {ppb} x {Lp} x {policy.vocab} x {wb} + 2 x {R} x {policy.vocab} x 4",
        )
    memory = (z.weights, kv, logits, *z.engine, z.overhead)
    return StageEstimate(
        "generate",
        memory,
        tuple(_decode_seconds(z, z.config.loop.prompts_per_iteration, K, "")),
        fits=sum(x.value for x in memory) <= z.memory_limit,
        key="generation.prompts_per_batch" if N * wb + RUNTIME_OVERHEAD_BYTES < z.memory_limit else "model.dtype",
    )


# -- reward scoring: b x K samples, sharded by batch; the policy stays resident ------------------------------


def _reward_peak(z: TextSizes) -> tuple[int, float]:
    """Bytes per reward-model weight, and its FLOP/s per GPU (tensor cores only for 16-bit weights)."""
    rb = BYTES_PER_ELEMENT.get(z.rm_dtype, 4)
    return rb, (z.hw.gpu_tflops if rb == 2 else z.hw.fp32_peak) * 1e12


def _score(z: TextSizes, reward: ModelShape) -> StageEstimate:
    S, P = z.S, z.P
    rb, rm_peak = _reward_peak(z)
    batch = z.config.reward.batch_size
    memory = (
        z.weights,
        Term("reward weights", reward.params * rb, f"N_rm x {rb} B = {reward.params:,} x {rb}"),
        Term(
            "reward forward",
            batch * S * (reward.hidden + reward.intermediate) * rb * 2,
            f"batch x S x (d + f) x {rb} B x 2 = {batch} x {S} x ({reward.hidden} + {reward.intermediate}) x {rb} x 2",
        ),
        *z.engine,
        z.overhead,
    )
    samples = z.config.loop.prompts_per_iteration * z.config.generation.samples_per_prompt
    flops = 2 * reward.params * S * samples / P
    return StageEstimate(
        "score (reward model)",
        memory,
        (
            Term(
                "forward",
                flops / (rm_peak * FORWARD_MFU),
                f"2 N_rm x S x bK / P / (peak x MFU) = 2 x {reward.params:.3g} x {S} x {samples} / {P}",
            ),
        ),
        fits=sum(x.value for x in memory) <= z.memory_limit,
        key="reward.args.dtype",
    )


# -- KL reference (selection.kl_coef > 0: log pi_0 of every sample, main process alone) ----------------------


def _kl_reference(z: TextSizes) -> tuple[StageEstimate, list[str]]:
    """The reference log-probs stage, and a warning when it outlasts the process group's timeout."""
    lp, N, S = z.config.loop, z.N, z.S
    memory = (z.weights, z.reference_weights, z.lp_memory, *z.engine, z.overhead)
    samples = lp.prompts_per_iteration * z.config.generation.samples_per_prompt
    seconds = 2 * N * S * samples / (z.gen_peak * FORWARD_MFU)  # no autocast: the weights dtype
    warnings = _timeout_warning(z, "computes reference log-probs", seconds)
    return StageEstimate(
        "select (KL reference, main process only)",
        memory,
        (Term("forward", seconds, f"2N x S x bK / (peak x MFU) = 2 x {N:.3g} x {S} x {samples}"),),
        fits=sum(x.value for x in memory) <= z.memory_limit,
        key="model.lora",
    ), warnings


def _timeout_warning(z: TextSizes, what: str, seconds: float) -> list[str]:
    """A warning when the main process works alone past the process group's timeout (the others wait in a collective)."""
    minutes = z.config.loop.process_group_timeout_minutes
    if seconds <= minutes * 60:
        return []
    return [
        f"the main process alone {what} for {seconds / 60:.0f} min, past "
        f"loop.process_group_timeout_minutes = {minutes:g}: raise it"
    ]


# -- fine-tune: DDP and FSDP (the one not chosen shown for comparison) ----------------------------------------


def _trainable(z: TextSizes) -> int:
    """Trained parameters: LoRA's adapters on peft's default targets, else every weight."""
    lora = z.config.model.lora
    return z.policy.lora_params_per_rank * lora.r if lora else z.N


def _train_time(z: TextSizes) -> tuple[Term, ...]:
    """The fine-tune's FLOPs at the measured MFU, then the checkpoint written and reloaded."""
    t, lora, N, S, P = z.config.training, z.config.model.lora, z.N, z.S, z.P
    kept = z.config.kept_per_iteration or z.config.loop.prompts_per_iteration
    tokens = kept * S * t.epochs  # every position is computed (prompt included), padded to S
    flops_per_token = (4 if lora else 6) * N + 12 * z.L * z.policy.hidden * S  # LoRA: no weight gradients of the base
    if t.gradient_checkpointing:
        flops_per_token += 2 * N  # one more forward
    train_seconds = flops_per_token * tokens / (P * z.peak * TRAIN_MFU)
    write = Term(
        "checkpoint", 2 * N * z.wb / DISK_BYTES_PER_S, f"write + reload N x {z.wb} B at {DISK_BYTES_PER_S / 1e9:g} GB/s"
    )
    return (
        Term(
            "train",
            train_seconds,
            f"({4 if lora else 6}N + 12 L d S) x tokens / (P x peak x MFU) = "
            f"{flops_per_token:.3g} x {tokens:,} / ({P} x {z.peak / 1e12:g}T x {TRAIN_MFU})",
        ),
        write,
    )


def _activations(z: TextSizes) -> Term:
    """The activations one micro-batch saves for the backward pass (one layer's inputs only when checkpointed)."""
    t, policy, L = z.config.training, z.policy, z.L
    mb_tokens = t.micro_batch_size * z.S
    ab = 2 if z.bf16_compute else 4
    per_token = activation_elements_per_token(policy)
    if t.gradient_checkpointing:
        return Term(
            "activations (checkpointed)",
            mb_tokens * (L * policy.hidden + per_token) * ab,
            f"B x S x (L x d + one layer's {per_token}) x {ab} B = {mb_tokens} x ({L} x {policy.hidden} + {per_token}) x {ab}",
        )
    return Term(
        "activations",
        mb_tokens * L * per_token * ab,
        f"B x S x L x (6d + 2kv + {4 if policy.gated_mlp else 2}f) x {ab} B = {mb_tokens} x {L} x {per_token} x {ab}",
    )


def _loss_logits(z: TextSizes) -> Term:
    t, vocab = z.config.training, z.policy.vocab
    mb_tokens = t.micro_batch_size * z.S
    loss_rows = min(mb_tokens, t.loss_chunk_tokens) if t.loss_chunk_tokens else mb_tokens
    # logits and log-softmax (float32), and in the backward their two float32 gradients; autocast adds bf16 logits
    loss_bytes = 20 if t.mixed_precision != "no" else 16
    return Term(
        "loss logits",
        loss_rows * vocab * loss_bytes,
        f"tokens x V x {loss_bytes} B (logits, log-softmax and their gradients) = {loss_rows} x {vocab} x {loss_bytes}",
    )


def _fine_tunes(z: TextSizes, sharding: str) -> list[StageEstimate]:
    """The fine-tune under DDP, then under FSDP; the strategy not chosen is marked as the alternative."""
    act, loss, time_terms = _activations(z), _loss_logits(z), _train_time(z)
    return [
        _fine_tune(z, strategy, (act, loss, *z.engine, z.overhead), time_terms, alternative=strategy != sharding)
        for strategy in ("ddp", "fsdp")
    ]


def _fine_tune(
    z: TextSizes, strategy: str, tail: tuple[Term, ...], time_terms: tuple[Term, ...], *, alternative: bool
) -> StageEstimate:
    """One strategy's fine-tune: weights, gradients and AdamW state (sharded under FSDP), then `tail`
    (activations, loss logits, a vLLM engine's terms, runtime)."""
    t, wb, N, P = z.config.training, z.wb, z.N, z.P
    trainable = _trainable(z)
    if strategy == "ddp":
        shard, name = 1, "fine-tune (DDP)"
        extra = [Term("DDP gradient buckets", trainable * wb, f"trainable x {wb} B")] if P > 1 else []
        if t.mixed_precision != "no" and wb == 4:
            extra.append(
                Term("autocast weight copies", trainable * 2, "trainable x 2 B (bf16 casts cached in the forward)")
            )
        master = wb
    else:
        shard, name = P, "fine-tune (FSDP)"
        master = 4 if t.mixed_precision != "no" else wb  # accelerate keeps float32 master weights under mixed precision
        extra = [
            Term(
                "gathered layers",
                2 * z.policy.layer_params * (2 if z.bf16_compute else wb),
                "2 layers' full weights (current + prefetch) in the compute dtype",
            )
        ]
    frozen = N - trainable
    memory = (
        Term(
            "weights",
            (trainable * master + frozen * wb) / shard,
            f"(trainable x {master} B + frozen x {wb} B) / {shard} = ({trainable:,} x {master} + {frozen:,} x {wb}) / {shard}",
        ),
        Term("gradients", trainable * master / shard, f"trainable x {master} B / {shard}"),
        Term("AdamW moments", 2 * trainable * master / shard, f"2 x trainable x {master} B / {shard}"),
        *extra,
        *tail,
    )
    total = sum(x.value for x in memory)
    act = tail[0]
    if total <= z.memory_limit:
        key = None
    elif strategy == "ddp" and P > 1:
        key = "sharding: accelerate launch --config_file examples/accelerate/fsdp.yaml"
    elif act.value > total / 3:
        key = "training.micro_batch_size" if t.gradient_checkpointing else "training.gradient_checkpointing"
    else:
        key = "model.lora"
    return StageEstimate(name, memory, time_terms, fits=total <= z.memory_limit, key=key, alternative=alternative)


# -- evaluation: generate for the held-out prompts (sharded), then the main process scores and measures ------


def _evaluate(z: TextSizes) -> tuple[StageEstimate, list[str]]:
    """The evaluation stage, and a warning when its main-process part outlasts the process group's timeout."""
    lp, N, S, wb = z.config.loop, z.N, z.S, z.wb
    E, k_eval = z.config.data.eval_prompts, lp.eval_samples_per_prompt
    eval_samples = E * k_eval
    # reference log-probs for the eval KL (none with loop.eval_kl off: no reference, no log-prob logits)
    main_only = 2 * N * S * eval_samples / (z.gen_peak * FORWARD_MFU) if lp.eval_kl else 0.0
    if z.reward is not None:
        _, rm_peak = _reward_peak(z)
        main_only += 2 * z.reward.params * S * eval_samples / (rm_peak * FORWARD_MFU)
    load = (N * wb + (0 if z.config.model.lora else N * wb)) / DISK_BYTES_PER_S
    kl = (z.reference_weights, z.lp_memory) if lp.eval_kl else ()
    memory = (z.weights, *kl, *z.engine, z.overhead)
    warnings = _timeout_warning(z, "scores the evaluation", main_only)
    return StageEstimate(
        "evaluate",
        memory,
        (
            *_decode_seconds(z, E, k_eval, "generate: "),
            Term(
                "score + KL (main process only)",
                main_only + load,
                f"(2N + 2N_rm) x S x {eval_samples} / (peak x MFU) + loading the reference",
            ),
        ),
        fits=sum(x.value for x in memory) <= z.memory_limit,
        key="model.lora",
    ), warnings
