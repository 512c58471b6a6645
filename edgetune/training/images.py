"""Image-folder classification data: ``DIR/<class>/<image>`` in, fixed-shape pixel batches out.

Why it is built this way:

* **Classes are the sub-folders**, sorted by name (index 0 is the first), unless the model's
  config names exactly the same labels (``label2id``), whose indices are then kept, so a model
  fine-tuned before keeps its label order. The number of classes must equal the classifier's
  outputs: a mismatch is an error, not a silently resized head.
* **Decoded once, up front.** Every image is opened, converted to RGB, resized (shorter side to
  the model's size, bilinear) and centre-cropped when the dataset is built, so a broken file is a
  one-line :class:`~edgetune.errors.DataError` naming it before training starts. They are kept as
  uint8 (3 B per pixel, a quarter of fp32) and normalised per batch.
* **Fixed shapes**: every example is (3, S, S), so :class:`~edgetune.training.data.BatchIterator`
  gives the same deterministic, resumable order and fixed batch shape as for text.
* **No torchvision**: PIL and torch only, imported lazily (``import edgetune`` stays light).

:class:`ImagePreprocessor` is what an image model has in place of a tokenizer: the image size
and normalisation, saved next to the compiled model as ``preprocessor.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import DataError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PREPROCESSOR_FILE = "preprocessor.json"
HF_PREPROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True)
class ImagePreprocessor:
    """Resize the shorter side to ``size``, centre-crop ``size`` × ``size``, scale to [0, 1], normalise."""

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    labels: tuple[str, ...] | None = None  # the classifier's labels by index (config.id2label)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / PREPROCESSOR_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "ImagePreprocessor":
        path = Path(directory) / PREPROCESSOR_FILE
        try:
            data = json.loads(path.read_text())
            labels = tuple(str(v) for v in data["labels"]) if data.get("labels") is not None else None
            return cls(int(data["size"]), tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"]),
                       labels)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: cannot read the image preprocessor ({exc})") from None

    @classmethod
    def for_model(cls, config, directory: str | os.PathLike | None = None) -> "ImagePreprocessor":
        """From a Hugging Face ``preprocessor_config.json`` when the model has one, else the config.

        ViT configs carry ``image_size`` (their processors normalise with mean = std = 0.5);
        ResNet configs do not (224, ImageNet statistics).
        """
        size = int(getattr(config, "image_size", 224) or 224)
        vit = getattr(config, "model_type", "") == "vit"
        mean, std = ((0.5,) * 3, (0.5,) * 3) if vit else (IMAGENET_MEAN, IMAGENET_STD)
        hf = Path(directory) / HF_PREPROCESSOR_FILE if directory is not None else None
        if hf is not None and hf.is_file():
            try:
                data = json.loads(hf.read_text())
                crop = data.get("crop_size") or data.get("size") or {}
                size = int(crop.get("height") or crop.get("shortest_edge") or size) if isinstance(crop, dict) else int(crop)
                mean = tuple(float(v) for v in data.get("image_mean", mean))
                std = tuple(float(v) for v in data.get("image_std", std))
            except (ValueError, TypeError, AttributeError) as exc:
                raise DataError(f"{hf}: malformed ({exc})") from None
        id2label = getattr(config, "id2label", None) or {}
        n = int(getattr(config, "num_labels", len(id2label)) or 0)
        labels = tuple(str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)) if n else None
        return cls(size, mean, std, labels)

    def to_uint8(self, image) -> torch.Tensor:
        """A PIL image -> (3, S, S) uint8."""
        from PIL import Image

        image = image.convert("RGB")
        w, h = image.size
        scale = self.size / min(w, h)
        nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        image = image.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        return data.view(self.size, self.size, 3).permute(2, 0, 1).contiguous()  # (3, S, S)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 -> float32 normalised."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return (pixels.float() / 255.0 - mean) / std


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def class_folders(path: Path) -> list[Path]:
    if not path.is_dir():
        raise DataError(f"{path}: not a directory (image data is a directory with one sub-folder per class)")
    classes = sorted(p for p in path.iterdir() if p.is_dir() and _visible(p))
    if not classes:
        raise DataError(f"{path}: no classes (expected one sub-folder of images per class)")
    return classes


def folder_sha256(path: str | os.PathLike) -> str:
    """One hash over every file under ``path`` (relative name + content), in sorted order."""
    from ..fsutil import sha256_file

    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


def data_sha256(path: str | os.PathLike) -> str:
    """The identity of a data file or image folder (what a run records, and a resume checks)."""
    from ..fsutil import sha256_file

    return folder_sha256(path) if Path(path).is_dir() else sha256_file(path)


@dataclass
class ImageDataset:
    """Labelled images ready for ``model(pixel_values=...)``: same protocol as ``TokenDataset``."""

    pixels: torch.Tensor  # (N, 3, S, S) uint8
    labels: torch.Tensor  # (N,) int64 class index
    classes: list[str]
    preprocessor: ImagePreprocessor
    source: str = ""
    task = "image-classification"

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_records(self) -> int:
        return len(self)

    def rows(self, index) -> dict[str, torch.Tensor]:
        """``pixel_values`` (B, 3, S, S) float32 and ``labels`` (B,)."""
        return {"pixel_values": self.preprocessor.normalise(self.pixels[index]), "labels": self.labels[index]}


def _label_index(classes: list[str], labels: tuple[str, ...] | None) -> dict[str, int]:
    if labels is not None and sorted(labels) == sorted(classes):
        return {c: labels.index(c) for c in classes}
    return {c: i for i, c in enumerate(classes)}


def build_image_dataset(path: str | os.PathLike, preprocessor: ImagePreprocessor) -> ImageDataset:
    """Read every image under ``path/<class>/``; the preprocessor's ``labels`` are the classifier's outputs."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    classes = class_folders(root)
    names = [c.name for c in classes]
    n_out = len(preprocessor.labels) if preprocessor.labels is not None else None
    if n_out is not None and n_out != len(names):
        raise DataError(f"{root}: {len(names)} classes ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}) "
                        f"but the model's classifier has {n_out} outputs (num_labels); compile a model with "
                        f"num_labels={len(names)}")
    index = _label_index(names, preprocessor.labels)
    pixels, labels = [], []
    for folder in classes:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and _visible(p))
        for f in files:
            try:
                with Image.open(f) as im:
                    pixels.append(preprocessor.to_uint8(im))
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise DataError(f"{f}: not a readable image ({reason})") from None
            labels.append(index[folder.name])
    if not pixels:
        raise DataError(f"{root}: no images in {', '.join(names)}")
    return ImageDataset(torch.stack(pixels), torch.tensor(labels, dtype=torch.long), names, preprocessor, str(root))
