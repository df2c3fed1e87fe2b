"""Image rewards, under the text rewards' contract with images first:

    def my_reward(images: list[PIL.Image], prompts: list[str], **columns) -> list[float | None]

Named in `raftlib.rewards.BUILT_INS` (config `reward.fn`), imported when a config first names one:

- `clip_score`: 100 * max(cos(image, prompt), 0) under a local (or hub) CLIPModel, as torchmetrics' CLIPScore;
- `aesthetic`: the LAION aesthetic predictor, a linear or MLP head on normalised CLIP ViT-L/14 image
  embeddings, with the head's weights from a local .safetensors or .pth (read with weights_only), its
  SHA-256 checked (`python -m raftlib.diffusion.fetch_laion DIR` fetches LAION's published head);
- `jpeg_compressibility`: minus the JPEG size in kB (DDPO's compressibility reward);
- `classifier_probability`: an image classifier's probability of the class in a data column (not the
  top-class probability, which pure noise can score well on).

Model-backed rewards load in `setup()` and free in `teardown()`, so the policy and the scorer are not
resident together longer than a scoring pass.
"""

from __future__ import annotations

import gc
import io
import logging
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raftlib.diffusion.fetch_laion import FETCH_COMMAND, PUBLISHED_HEADS, sha256_of
from raftlib.rewards import RewardError, import_object

logger = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _dtype(name: str, device: torch.device) -> torch.dtype:
    """The scorer's weights dtype; auto = bfloat16 on CUDA (float16 where bf16 is missing), float32 on CPU."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in _DTYPES:
        raise RewardError(f"reward.args.dtype = {name!r}: expected auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _rgb(images: list) -> list:
    return [image.convert("RGB") for image in images]


@contextmanager
def _loaded_for_call(scorer, loaded: bool):
    """Inside the scoring stage the scorer is already set up; called on its own (a notebook cell), it is
    set up for this call and freed after it."""
    if loaded:
        yield
        return
    scorer.setup()
    try:
        yield
    finally:
        scorer.teardown()


class _ClipBacked:
    """Loads a CLIPModel + CLIPProcessor in setup(), frees them in teardown()."""

    def __init__(self, clip: str, batch_size: int = 32, device: str | None = None, dtype: str = "auto") -> None:
        self.clip, self.batch_size, self.device = clip, batch_size, _device(device)
        self.dtype = _dtype(dtype, self.device)
        self.model = self.processor = None

    def setup(self) -> None:
        from transformers import CLIPModel, CLIPProcessor

        from raftlib.hub import check_local

        check_local(self.clip, "CLIP model")
        model = CLIPModel.from_pretrained(self.clip, use_safetensors=True, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(self.clip)

    def teardown(self) -> None:
        self.model = self.processor = None
        gc.collect()

    @torch.no_grad()
    def image_embeddings(self, images: list) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=_rgb(images[start : start + self.batch_size]), return_tensors="pt")
            features = self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device, self.dtype))
            features = getattr(features, "pooler_output", features)
            chunks.append(torch.nn.functional.normalize(features.float(), dim=-1))
        return torch.cat(chunks)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.processor(
                text=texts[start : start + self.batch_size], return_tensors="pt", padding=True, truncation=True
            )
            features = self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
            )
            features = getattr(features, "pooler_output", features)
            chunks.append(torch.nn.functional.normalize(features.float(), dim=-1))
        return torch.cat(chunks)


class ClipScore(_ClipBacked):
    def __call__(self, images: list, prompts: list[str], **columns: Any) -> list[float | None]:
        with _loaded_for_call(self, self.model is not None):
            cosine = (self.image_embeddings(images) * self.text_embeddings(list(prompts))).sum(-1)
            return (100.0 * cosine.clamp(min=0)).cpu().tolist()


def clip_score(clip: str, batch_size: int = 32, device: str | None = None, dtype: str = "auto") -> ClipScore:
    """args: {clip: local CLIP dir or hub id (paper: openai/clip-vit-large-patch14), batch_size, device, dtype}."""
    return ClipScore(clip, batch_size, device, dtype)


def check_aesthetic_head(path: str | Path, sha256: str | None = None) -> Path:
    """The head file exists and is the file it should be; raises RewardError naming the fix otherwise.

    The expected SHA-256 is `sha256` if given, else LAION's published checksum for a file of that name, else
    the `<file>.sha256` beside it (written with a stand-in). A head with none of these loads unchecked.
    """
    path = Path(path)
    if not path.is_file():
        raise RewardError(
            f"aesthetic head {str(path)!r}: no such file. Fetch LAION's published head (sa_0_4_vit_l_14_linear.pth, "
            f"github.com/LAION-AI/aesthetic-predictor) with `{FETCH_COMMAND} {path.parent}`"
        )
    sidecar = path.with_name(path.name + ".sha256")
    expected = (
        sha256 or PUBLISHED_HEADS.get(path.name) or (sidecar.read_text().split()[0] if sidecar.is_file() else None)
    )
    if expected is None:
        logger.warning("aesthetic head %s: no checksum to check it against (pass reward.args.sha256)", path)
        return path
    actual = sha256_of(path)
    if actual != expected.lower():
        raise RewardError(
            f"aesthetic head {path}: SHA-256 {actual} is not the expected {expected}; fetch it again with "
            f"`{FETCH_COMMAND} {path.parent}` (after removing it)"
        )
    return path


def load_aesthetic_head(path: str | Path, sha256: str | None = None) -> torch.nn.Module:
    """A linear (`weight`, `bias`) or MLP (`layers.N.weight`) head, as LAION's predictors are published.

    LAION's V1 head (`sa_0_4_vit_l_14_linear.pth`) is a pickled state dict of `nn.Linear(768, 1)`; the improved
    predictor's MLP has no activations between its Linear layers (only dropout, inert at eval), so the Linear
    layers in key order are the whole function. The file's checksum is checked first (`check_aesthetic_head`).
    """
    path = check_aesthetic_head(path, sha256)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)  # a pickle never runs code here
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if set(state) == {"weight", "bias"}:
        head = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
        head.load_state_dict(state)
        return head.eval()
    indices = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")})
    if not indices:
        raise RewardError(
            f"aesthetic head {path}: expected keys weight/bias or layers.N.weight, got {sorted(state)[:6]}"
        )
    layers = []
    for index in indices:
        weight = state[f"layers.{index}.weight"]
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
        layer.load_state_dict({"weight": weight, "bias": state[f"layers.{index}.bias"]})
        layers.append(layer)
    return torch.nn.Sequential(*layers).eval()


class Aesthetic(_ClipBacked):
    def __init__(
        self,
        clip: str,
        head: str,
        batch_size: int = 32,
        device: str | None = None,
        dtype: str = "auto",
        sha256: str | None = None,
    ) -> None:
        super().__init__(clip, batch_size, device, dtype)
        self.head_path, self.sha256 = head, sha256
        self.head = None
        check_aesthetic_head(head, sha256)  # at construction: before any model of the run loads

    def setup(self) -> None:
        super().setup()
        self.head = load_aesthetic_head(self.head_path, self.sha256).to(self.device)
        expected = self.head[0].in_features if isinstance(self.head, torch.nn.Sequential) else self.head.in_features
        if expected != self.model.config.projection_dim:
            raise RewardError(
                f"aesthetic head {self.head_path} expects {expected}-dim CLIP embeddings; {self.clip} gives "
                f"{self.model.config.projection_dim} (LAION's heads need CLIP ViT-L/14)"
            )

    def teardown(self) -> None:
        self.head = None
        super().teardown()

    @torch.no_grad()
    def __call__(self, images: list, prompts: list[str], **columns: Any) -> list[float | None]:
        with _loaded_for_call(self, self.head is not None):
            return self.head(self.image_embeddings(images)).squeeze(-1).cpu().tolist()


def aesthetic(
    clip: str,
    head: str,
    batch_size: int = 32,
    device: str | None = None,
    dtype: str = "auto",
    sha256: str | None = None,
) -> Aesthetic:
    """args: {clip: CLIP ViT-L/14 dir or hub id, head: the predictor's .safetensors/.pth, batch_size, device,
    dtype (of CLIP), sha256 (of the head; default: its .sha256 sidecar or LAION's published checksum)}."""
    return Aesthetic(clip, head, batch_size, device, dtype, sha256)


def jpeg_compressibility(quality: int = 95) -> Callable[..., list[float | None]]:
    """-(JPEG size in kB) at `quality`: simpler, smoother images score higher (DDPO's compressibility)."""

    def compressibility(images: list, prompts: list[str], **columns: Any) -> list[float | None]:
        sizes = []
        for image in _rgb(images):
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=quality)
            sizes.append(-len(buffer.getvalue()) / 1000.0)
        return sizes

    return compressibility


class ClassifierProbability:
    """p(class = columns[label_column][i] | image_i) under an image classifier."""

    def __init__(
        self, path: str | None, classifier: str | None, classifier_args: dict, label_column: str, device: str | None
    ) -> None:
        if (path is None) == (classifier is None):
            raise RewardError(
                "classifier_probability: give exactly one of `path` (an HF image classifier dir) "
                "or `classifier` (a module:function returning images -> class probabilities)"
            )
        self.path, self.classifier, self.classifier_args = path, classifier, classifier_args
        self.label_column, self.device = label_column, _device(device)
        self.predict: Callable[[list], np.ndarray] | None = None

    def setup(self) -> None:
        if self.classifier is not None:
            self.predict = import_object(self.classifier)(**self.classifier_args)
            return
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        from raftlib.hub import check_local

        check_local(self.path, "image classifier")
        model = AutoModelForImageClassification.from_pretrained(self.path, use_safetensors=True).to(self.device).eval()
        processor = AutoImageProcessor.from_pretrained(self.path)

        @torch.no_grad()
        def predict(images: list) -> np.ndarray:
            inputs = processor(images=_rgb(images), return_tensors="pt").to(self.device)
            return model(**inputs).logits.float().softmax(-1).cpu().numpy()

        self.predict = predict

    def teardown(self) -> None:
        self.predict = None
        gc.collect()

    def __call__(self, images: list, prompts: list[str], **columns: Any) -> list[float | None]:
        if self.label_column not in columns:
            raise RewardError(
                f"classifier_probability: the data has no column {self.label_column!r} "
                f"(columns: {', '.join(sorted(columns)) or 'none'}); set reward.args.label_column"
            )
        with _loaded_for_call(self, self.predict is not None):
            probabilities = np.asarray(self.predict(list(images)))
        rewards: list[float | None] = []
        for row, label in zip(probabilities, columns[self.label_column], strict=True):
            try:
                index = int(label)
            except (TypeError, ValueError):
                rewards.append(None)  # no usable label: cannot score, never kept
                continue
            rewards.append(float(row[index]) if 0 <= index < len(row) else None)
        return rewards


def classifier_probability(
    path: str | None = None,
    classifier: str | None = None,
    classifier_args: dict | None = None,
    label_column: str = "label",
    device: str | None = None,
) -> ClassifierProbability:
    """args: {path: HF image classifier dir | classifier: module:function (+ classifier_args), label_column}."""
    return ClassifierProbability(path, classifier, classifier_args or {}, label_column, device)
