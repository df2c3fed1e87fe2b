"""The tiny diffusion setting: a class-conditional UNet on scikit-learn's 8x8 digits, and its scorers.

    python -m raftsuite.digits assets/tiny-digits      (make tiny-digits; see BUILD.json for the times)

Builds and saves, all offline from the 1,797 digit images that ship inside scikit-learn:

- `real-digits.safetensors`: those 1,797 images and labels as scikit-learn's `load_digits` returns them, so
  nothing but this build imports scikit-learn (installed, transformers imports it in every process: 1.6 s
  each on this machine, `docs/performance.md`); `--data-only` writes just this file;
- `unet/` + `scheduler/`: a label-conditioned pixel-space UNet2DModel (classes 0-9, class 10 = null
  for classifier-free guidance), trained at 8x8 with the standard denoising loss;
- `noisy-labels/`: the same model trained with half of its labels replaced at random, the stand-in for
  Stable Diffusion's noisy web captions: it draws the prompted digit only part of the time (the base of
  the text-image alignment experiment);
- `classifier.safetensors`: a small CNN digit classifier, the stand-in for CLIP in the text-image
  alignment experiment (reward = its probability of the prompted digit) and the feature space of the
  Frechet distance to the real digits;
- `quality.safetensors`: a 16x16 quality scorer, the stand-in for the LAION aesthetic predictor in the
  resolution experiment: trained to tell real digits shown at 16x16 from degraded ones (noise, blur, patch
  shuffles, smooth blobs, smeared strokes, and digits at the wrong scale: tiled or shrunk), never on the
  diffusion model's output. The blobs and smeared strokes were added after a first scorer without them was
  reward-hacked by RAFT into bright blobs (its report showed reward up, distance to the digits up);
- `BUILD.json`: sizes, held-out accuracies, losses, time and versions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NATIVE = 8
"""The digits' (and the model's) native resolution."""
ADAPTED = 16
"""The resolution the resolution-adaptation experiment asks for."""
HELD_OUT = 297
"""Real digits held out from every model (classifier, scorer, UNet) for evaluation."""


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


DATA_FILE = "real-digits.safetensors"
"""The real digits in the asset folder (written by the build from scikit-learn)."""
DATA = Path("assets") / "tiny-digits" / DATA_FILE
"""Where the notebooks find them: repository-relative, as their parameters are (the kernel runs at the root)."""


def export_real_digits(out: Path) -> Path:
    """Write scikit-learn's 1,797 digits (raw 0-16 pixel values, labels) to `out/real-digits.safetensors`,
    read back and compared before returning; its metadata names the source and the scikit-learn version."""
    import sklearn
    from safetensors.numpy import save_file
    from sklearn.datasets import load_digits

    data = load_digits()
    path = out / DATA_FILE
    arrays = {"images": data.images.astype(np.uint8), "labels": data.target.astype(np.int64)}
    out.mkdir(parents=True, exist_ok=True)
    # one metadata key: safetensors writes a map's keys in no fixed order, and the file's hash should not move
    save_file(
        arrays, str(path), metadata={"source": f"sklearn.datasets.load_digits, scikit-learn {sklearn.__version__}"}
    )
    images, labels = _read_data(path)
    if not (np.array_equal(images, data.images) and np.array_equal(labels, data.target)):
        raise RuntimeError(f"{path} does not read back as load_digits' arrays (pixels not integers 0-16?)")
    return path


def _read_data(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from safetensors.numpy import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{path}: the real digits are missing; `make tiny-digits` writes them "
            "(python -m raftsuite.digits assets/tiny-digits --data-only, with scikit-learn installed)"
        )
    arrays = load_file(str(path))
    return arrays["images"], arrays["labels"]


def real_digits(split: str = "all", data: str | Path = DATA) -> tuple[np.ndarray, np.ndarray]:
    """(N, 8, 8) uint8 images (0-16 scaled to 0-255) and labels; split: all | train | heldout (fixed).

    `data`: the build's copy of scikit-learn's digits (default: the committed asset's)."""
    raw, labels = _read_data(Path(data))
    images = np.round(raw / 16.0 * 255).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    chosen = {"all": order, "heldout": order[:HELD_OUT], "train": order[HELD_OUT:]}[split]
    return images[chosen], labels[chosen]


def as_tensor(images: Sequence[Any], size: int | None = None) -> torch.Tensor:
    """Images (PIL, or uint8 arrays (H, W) / (H, W, 1)) -> (N, 1, size, size) float in [0, 1]."""
    arrays = [np.asarray(i, dtype=np.float32) for i in images]
    arrays = [a[..., 0] if a.ndim == 3 else a for a in arrays]
    batch = torch.from_numpy(np.stack(arrays))[:, None] / 255.0
    if size is not None and batch.shape[-1] != size:
        batch = F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return batch


def upsample(images: np.ndarray, size: int) -> np.ndarray:
    """Real 8x8 digits shown at `size` x `size` (bilinear): what a digit looks like at that resolution."""
    return (as_tensor(images, size)[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def write_prompts(path: Path, per_digit: int = 30) -> Path:
    """`per_digit` prompts per digit, {"prompt": "a handwritten digit 3", "label": 3}, interleaved."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"a handwritten digit {d}", "label": d} for _ in range(per_digit) for d in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------------------------
# The scorers (small CNNs)
# ----------------------------------------------------------------------------------------------


class DigitClassifier(nn.Module):
    """8x8 input (anything else is resized to 8x8 first): 10 logits, and a 64-d feature for distances."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, 64)
        self.out = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != NATIVE:
            x = F.interpolate(x, size=(NATIVE, NATIVE), mode="bilinear", align_corners=False, antialias=True)
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


class QualityScorer(nn.Module):
    """16x16 input: one logit, high for a well-formed digit at this resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != ADAPTED:
            x = F.interpolate(x, size=(ADAPTED, ADAPTED), mode="bilinear", align_corners=False, antialias=True)
        return self.net(x).squeeze(-1)


def _shift(batch: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random translations by up to `max_shift` pixels (zero fill): the digits are not all centred alike."""
    out = torch.zeros_like(batch)
    size = batch.shape[-1]
    for i in range(len(batch)):
        dy, dx = (torch.randint(-max_shift, max_shift + 1, (2,), generator=generator)).tolist()
        ys, yd = slice(max(0, -dy), size - max(0, dy)), slice(max(0, dy), size - max(0, -dy))
        xs, xd = slice(max(0, -dx), size - max(0, dx)), slice(max(0, dx), size - max(0, -dx))
        out[i, :, yd, xd] = batch[i, :, ys, xs]
    return out


def degrade(real16: torch.Tensor, real8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Degraded 16x16 digits, seven kinds in equal parts; (N, 1, 16, 16) in [0, 1]."""
    n = len(real16)
    kinds = torch.randint(0, 7, (n,), generator=generator)
    out = real16.clone()
    for i in range(n):
        kind = int(kinds[i])
        if kind == 0:  # noise
            sigma = 0.2 + 0.4 * torch.rand((), generator=generator)
            out[i] = (real16[i] + sigma * torch.randn(real16[i].shape, generator=generator)).clamp(0, 1)
        elif kind == 1:  # blur
            out[i] = F.interpolate(F.avg_pool2d(real16[i : i + 1], 4), size=(ADAPTED, ADAPTED), mode="nearest")[0]
        elif kind == 2:  # four small digits tiled: what a UNet trained at 8x8 tends to draw at 16x16
            picks = torch.randint(0, len(real8), (4,), generator=generator)
            tiles = real8[picks]
            out[i] = torch.cat([torch.cat([tiles[0], tiles[1]], -1), torch.cat([tiles[2], tiles[3]], -1)], -2)
        elif kind == 3:  # one small digit somewhere on an empty canvas: the right content at the wrong scale
            canvas = torch.zeros_like(real16[i])
            y, x = torch.randint(0, ADAPTED - NATIVE + 1, (2,), generator=generator).tolist()
            canvas[:, y : y + NATIVE, x : x + NATIVE] = real8[
                int(torch.randint(0, len(real8), (1,), generator=generator))
            ]
            out[i] = canvas
        elif kind == 4:  # 4x4 patches shuffled
            patches = real16[i].unfold(1, 4, 4).unfold(2, 4, 4).reshape(1, 16, 4, 4)
            patches = patches[:, torch.randperm(16, generator=generator)].reshape(1, 4, 4, 4, 4)
            out[i] = patches.permute(0, 1, 3, 2, 4).reshape(1, ADAPTED, ADAPTED)
        elif kind == 5:  # smooth bright blobs: large-scale shapes with no strokes
            coarse = torch.rand((1, 1, 4, 4), generator=generator)
            blobs = F.interpolate(coarse, size=(ADAPTED, ADAPTED), mode="bilinear", align_corners=False)[0]
            out[i] = ((blobs - blobs.min()) / (blobs.max() - blobs.min() + 1e-6)).clamp(0, 1)
        else:  # strokes smeared thick (3x3 dilation, twice): the digit's outline lost in a bright mass
            out[i] = F.max_pool2d(F.max_pool2d(real16[i : i + 1], 3, 1, 1), 3, 1, 1)[0]
    return out


def train_classifier(images: np.ndarray, labels: np.ndarray, steps: int = 1500, seed: int = 0) -> DigitClassifier:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    x, y = as_tensor(images), torch.from_numpy(labels).long()
    for _ in range(steps):
        index = torch.randint(0, len(x), (128,), generator=generator)
        batch = _shift(x[index], generator, 1)
        loss = F.cross_entropy(model(batch), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def train_quality_scorer(images: np.ndarray, steps: int = 1500, seed: int = 0) -> QualityScorer:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = QualityScorer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    real8, real16 = as_tensor(images), as_tensor(images, ADAPTED)
    for _ in range(steps):
        index = torch.randint(0, len(real8), (64,), generator=generator)
        positive = _shift(real16[index], generator, 2)
        negative = degrade(positive, real8, generator)
        logits = model(torch.cat([positive, negative]))
        target = torch.cat([torch.ones(64), torch.zeros(64)])
        loss = F.binary_cross_entropy_with_logits(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _save(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def _load(cls: type[nn.Module], path: str | Path) -> nn.Module:
    from safetensors.torch import load_file

    model = cls()
    model.load_state_dict(load_file(Path(path)))
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Rewards and measures used by the notebooks
# ----------------------------------------------------------------------------------------------


def digit_probabilities(path: str):
    """A `classifier` for raftlib's built-in `classifier_probability` reward: images -> (N, 10) probabilities."""
    model = load_classifier(path)

    @torch.no_grad()
    def predict(images: list) -> np.ndarray:
        return model(as_tensor(images)).softmax(-1).numpy()

    return predict


def quality_reward(path: str):
    """The resolution experiment's reward: the quality scorer's logit (log-odds of a well-formed 16x16 digit).

    The logit, not the probability: the base model's 16x16 images all score P ~ 0, where a probability
    would flatten every difference RAFT needs to rank (LAION's aesthetic score is unbounded too).
    """
    model = _load(QualityScorer, path)

    @torch.no_grad()
    def quality(images: list, prompts: list[str], **columns: Any) -> list[float | None]:
        return model(as_tensor(images)).tolist()

    return quality


def load_classifier(path: str | Path) -> DigitClassifier:
    return _load(DigitClassifier, path)


@torch.no_grad()
def classifier_features(images: Sequence[Any], classifier: DigitClassifier) -> np.ndarray:
    return classifier.features(as_tensor(images)).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID's formula, digit-classifier features)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    # ReLU features include dead units (zero variance): a small ridge keeps the covariances invertible,
    # as FID's reference implementation does when the product's square root is not finite.
    ridge = 1e-6 * np.eye(a.shape[1])
    cov_a, cov_b = np.cov(a, rowvar=False) + ridge, np.cov(b, rowvar=False) + ridge
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def nearest_real_distance(images: Sequence[Any], real: np.ndarray) -> float:
    """Mean over images of the RMS pixel distance ([0, 1] scale) to the nearest real digit at the same size."""
    size = np.asarray(images[0]).shape[0]
    generated = as_tensor(images).flatten(1).numpy().astype(np.float64)
    reference = as_tensor(real, size).flatten(1).numpy().astype(np.float64)
    squared = (generated**2).sum(1)[:, None] + (reference**2).sum(1)[None, :] - 2 * generated @ reference.T
    return float(np.sqrt(np.clip(squared.min(1), 0, None) / generated.shape[1]).mean())


# ----------------------------------------------------------------------------------------------
# The class-conditional UNet
# ----------------------------------------------------------------------------------------------


def build_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=NATIVE,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=11,
        attention_head_dim=8,
    )


def train_unet(
    images: np.ndarray,
    labels: np.ndarray,
    steps: int,
    seed: int = 0,
    label_dropout: float = 0.15,
    label_noise: float = 0.0,
):
    """Denoising training at 8x8 with classifier-free-guidance label dropout; returns (unet, last losses).

    `label_noise` replaces that share of the labels with a random digit, the stand-in for the noisy web
    captions Stable Diffusion learned from: the model then follows its prompt only part of the time.
    """
    from diffusers import DDPMScheduler

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet = build_unet()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    x = as_tensor(images) * 2 - 1
    y = torch.from_numpy(labels).long()
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:  # linear decay
            group["lr"] = 2e-3 * (1 - step / steps) + 1e-5
        index = torch.randint(0, len(x), (128,), generator=generator)
        x0, label = x[index], y[index].clone()
        if label_noise > 0:
            noisy = torch.rand(128, generator=generator) < label_noise
            label[noisy] = torch.randint(0, 10, (int(noisy.sum()),), generator=generator)
        label[torch.rand(128, generator=generator) < label_dropout] = 10
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (128,), generator=generator)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t, class_labels=label).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return unet.eval(), losses


NOISY_LABELS = "noisy-labels"
"""Subdir of the build: the same UNet trained with half its labels replaced at random (the alignment base)."""
LABEL_NOISE = 0.5


def save_unet(unet, out: Path) -> None:
    from diffusers import DDIMScheduler

    unet.save_pretrained(out / "unet", safe_serialization=True)
    DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", steps_offset=1).save_pretrained(
        out / "scheduler"
    )


def build_noisy_labels(out: Path, data: Path, unet_steps: int = 3000) -> dict[str, Any]:
    """The text-image alignment base model: trained like the main one, but on noisy labels."""
    started = time.time()
    train_x, train_y = real_digits("train", data)
    unet, losses = train_unet(train_x, train_y, unet_steps, label_noise=LABEL_NOISE)
    save_unet(unet, out)
    return {
        "label_noise": LABEL_NOISE,
        "unet_steps": unet_steps,
        "unet_loss_last_100": float(np.mean(losses[-100:])),
        "minutes": round((time.time() - started) / 60, 1),
    }


def build_quality_scorer(out: Path, data: Path, scorer_steps: int = 1500) -> dict[str, Any]:
    """Train, evaluate on held-out digits and save the 16x16 quality scorer; returns its record."""
    train_x, _ = real_digits("train", data)
    held_x, _ = real_digits("heldout", data)
    scorer = train_quality_scorer(train_x, scorer_steps)
    generator = torch.Generator().manual_seed(1)
    real16 = as_tensor(held_x, ADAPTED)
    with torch.no_grad():
        p_real = torch.sigmoid(scorer(real16))
        p_degraded = torch.sigmoid(scorer(degrade(real16, as_tensor(held_x), generator)))
    _save(scorer, out / "quality.safetensors")
    return {
        "quality_scorer_heldout_balanced_accuracy": float(
            ((p_real > 0.5).float().mean() + (p_degraded < 0.5).float().mean()) / 2
        ),
        "quality_scorer_heldout_p_real": {"real": float(p_real.mean()), "degraded": float(p_degraded.mean())},
    }


def build(out: Path, unet_steps: int = 3000, scorer_steps: int = 1500) -> dict[str, Any]:
    """Train and save everything under `out` (see the module docstring)."""
    import diffusers
    import sklearn

    started = time.time()
    data = export_real_digits(out)
    train_x, train_y = real_digits("train", data)
    held_x, held_y = real_digits("heldout", data)

    classifier = train_classifier(train_x, train_y, scorer_steps)
    with torch.no_grad():
        accuracy = float((classifier(as_tensor(held_x)).argmax(-1).numpy() == held_y).mean())
        accuracy16 = float((classifier(as_tensor(upsample(held_x, ADAPTED))).argmax(-1).numpy() == held_y).mean())
    _save(classifier, out / "classifier.safetensors")
    scorer_record = build_quality_scorer(out, data, scorer_steps)

    unet, losses = train_unet(train_x, train_y, unet_steps)
    save_unet(unet, out)
    noisy_record = build_noisy_labels(out / NOISY_LABELS, data, unet_steps)
    record = {
        "data": f"sklearn.datasets.load_digits: {len(train_x)} train / {len(held_x)} held-out 8x8 digits",
        "data_file": data_record(data),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "unet_steps": unet_steps,
        "unet_loss_last_100": float(np.mean(losses[-100:])),
        "classifier_heldout_accuracy_8px": accuracy,
        "classifier_heldout_accuracy_16px_upsampled": accuracy16,
        **scorer_record,
        "noisy_labels": noisy_record,
        "minutes": round((time.time() - started) / 60, 1),
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "scikit-learn": sklearn.__version__,
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / "BUILD.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def data_record(path: Path) -> dict[str, Any]:
    """The data file's name, SHA-256 and source, as BUILD.json keeps them."""
    import hashlib

    from safetensors import safe_open

    with safe_open(str(path), "numpy") as handle:
        metadata = handle.metadata()
    return {
        "file": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "source": metadata["source"],
    }


def export_data_only(out: Path) -> dict[str, Any]:
    """Write only the data file into an existing asset folder and record it in its BUILD.json (the models stay)."""
    record_path = out / "BUILD.json"
    record = json.loads(record_path.read_text())
    record["data_file"] = data_record(export_real_digits(out))
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record["data_file"]


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--unet-steps", type=int, default=3000)
    parser.add_argument("--scorer-steps", type=int, default=1500)
    parser.add_argument("--data-only", action="store_true", help="write only real-digits.safetensors")
    args = parser.parse_args()
    if args.data_only:
        print(json.dumps(export_data_only(args.out), indent=2))
    else:
        print(json.dumps(build(args.out, args.unet_steps, args.scorer_steps), indent=2))


if __name__ == "__main__":
    main()
