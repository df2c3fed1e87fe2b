"""RAFT for causal language models: K completions per prompt, completion-only fine-tuning, KL and perplexity.

`config` (RAFTConfig), `prompts` (prompt tokens), `sampling` (the pure numerics and the end-of-row rule under
both decoders), `generate` (the eager decoder), `fastgen` (the static-cache decoder), `vllm_backend`, `models`
(loading and saving), `finetune` (the completion loss and log-probabilities), `losses` (RAFT++), `rewards` (the
built-in text rewards), `plan` (the memory and time planner's language-model stages) and `modality` (what
the loop calls). Nothing is imported here, so loading the config
does not load the decoders.
"""
