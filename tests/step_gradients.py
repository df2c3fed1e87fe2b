"""Record the gradient of a fine-tune stage's first optimizer step (tests only).

    python tests/step_gradients.py MODEL_DIR OUT.safetensors MICRO_BATCH ACCUMULATION [packing]

Runs `raftlib.text.finetune.finetune` on `EXAMPLES` with the given micro-batch size and accumulation (under
`accelerate launch` on as many processes as it is given) and writes the parameters' gradients as they are when
the first optimizer step is taken (after the processes' reduction), from the main process.
"""

import sys

import torch

EXAMPLES = [
    ([5, 6, 7], [8, 9, 10, 11, 12, 13, 14]),
    ([12, 13], [14, 15]),
    ([3, 4, 5, 6, 7], [1]),
    ([9], [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]),
    ([20, 21, 22], [23, 24, 25]),
    ([30], [31]),
    ([40, 41], [42, 43, 44, 45, 46]),
    ([50, 51, 52, 53], [54, 55, 56, 57, 58, 59]),
]
"""Eight kept samples whose completions have 1 to 11 tokens: a mean of micro-batch means weighs them unevenly."""


def first_step_gradients(model_dir: str, micro_batch_size: int, accumulation: int, packing: bool = False) -> dict:
    from transformers import AutoModelForCausalLM

    from raftlib.sections import TrainingSection
    from raftlib.text.finetune import finetune

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    section = TrainingSection(
        learning_rate=1e-3,
        epochs=1,
        micro_batch_size=micro_batch_size,
        gradient_accumulation_steps=accumulation,
        packing=packing,
        max_grad_norm=0.0,
    )
    seen = {}
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        if not seen:
            for group in self.param_groups:
                for parameter in group["params"]:
                    seen[len(seen)] = parameter.grad.detach().clone()
        return step(self, *args, **kwargs)

    torch.optim.AdamW.step = recording
    try:
        finetune(model, EXAMPLES, section, pad_id=0, seed=0, iteration=1, progress=False)
    finally:
        torch.optim.AdamW.step = step
    return {str(index): gradient for index, gradient in seen.items()}


if __name__ == "__main__":
    from safetensors.torch import save_file

    model_dir, out, micro, accumulation = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    gradients = first_step_gradients(model_dir, micro, accumulation, packing="packing" in sys.argv[5:])
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        sys.exit(0)
    save_file(gradients, out)
