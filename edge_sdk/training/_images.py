"""Image classification data: a folder of class sub-folders (torchvision's ImageFolder layout), for ViT.

Layout: ``ROOT/CLASS/IMAGE`` (one sub-folder per class, images directly inside it, any of
:data:`IMAGE_EXTENSIONS`; other files and hidden entries are skipped). The class names are the
sub-folder names, sorted; class ``i`` of that order is label ``i``.

Preprocessing follows the model folder's ``preprocessor_config.json`` (:class:`ImageProcessing`; the
settings of transformers' ``ViTImageProcessor``, without needing transformers or torchvision): convert
to RGB, resize to ``size`` with ``resample``, multiply by ``rescale_factor``, normalize with
``image_mean``/``image_std``; the result is ``pixel_values`` float32 ``[n, 3, H, W]``. Without a
processor file, ViTImageProcessor's defaults apply and the size is taken from the model the
coordinator sends (:meth:`ImageDataset.fit_model`).

:class:`ImageDataset` is a :class:`~edge_sdk.training._runner.BatchSource`: ``len`` and endless
shuffled ``batches`` of ``{"pixel_values", "labels"}``, ``eval_batches`` for evaluation. Every file is
decoded once when the data set is built (a corrupt, truncated or unreadable image is a
:class:`~edge_sdk.ConfigError` naming the file, before any model loads); pixels are decoded per batch,
so memory holds one batch of images, not the folder.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._errors import ConfigError, SpecError
from edge_sdk.training._labels import LabelMap

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "ImageFolder",
    "ImageProcessing",
    "image_seq_len",
    "read_image_folder",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
MAX_SIDE = 4096  # a preprocessed image's height and width are at most this
_RESAMPLE = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


def image_seq_len(config: Mapping[str, Any]) -> int | None:
    """The tokens a ViT-style encoder sees: ``(image_size / patch_size)^2`` patches plus [CLS]; None
    for a model without ``image_size`` and ``patch_size`` (a text model)."""
    size, patch = config.get("image_size"), config.get("patch_size")
    if not isinstance(size, int) or not isinstance(patch, int) or size < 1 or patch < 1:
        return None
    return (size // patch) ** 2 + 1


@dataclass(frozen=True)
class ImageProcessing:
    """How images become ``pixel_values`` (ViTImageProcessor's settings and defaults).

    ``size`` (height, width) None: not known yet, taken from the model (:meth:`sized_for`).
    """

    size: tuple[int, int] | None = None
    resample: int = 2  # PIL's BILINEAR
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.size is not None and not all(isinstance(s, int) and 1 <= s <= MAX_SIDE for s in self.size):
            raise ConfigError(f"image size must be two integers in [1, {MAX_SIDE}], got {self.size}")
        if self.resample not in _RESAMPLE:
            raise ConfigError(f"resample must be one of {sorted(_RESAMPLE)} (PIL's filters), got {self.resample}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or not all(s > 0 for s in self.image_std):
            raise ConfigError(f"image_mean and image_std need 3 values (std > 0): {self.image_mean}, {self.image_std}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "preprocessor config") -> ImageProcessing:
        """Read ``preprocessor_config.json``'s keys (unknown ones ignored, as transformers does)."""
        try:
            size = _size(data.get("size"))
            return cls(
                size=size,
                resample=int(data.get("resample", 2)),
                do_resize=bool(data.get("do_resize", True)),
                do_rescale=bool(data.get("do_rescale", True)),
                rescale_factor=float(data.get("rescale_factor", 1 / 255)),
                do_normalize=bool(data.get("do_normalize", True)),
                image_mean=_triple(data.get("image_mean", 0.5)),
                image_std=_triple(data.get("image_std", 0.5)),
            )
        except (TypeError, ValueError, ConfigError) as exc:
            raise ConfigError(f"{where}: {exc}") from None

    @classmethod
    def from_model_dir(cls, folder: str | Path | None) -> ImageProcessing:
        """The settings of ``folder``'s ``preprocessor_config.json``; the defaults (size from the model)
        when ``folder`` is None or has no such file."""
        if folder is None:
            return cls()
        path = Path(folder).expanduser()
        path = path / "preprocessor_config.json" if path.is_dir() else path
        if not path.is_file():
            logger.info("no %s: ViTImageProcessor's defaults, the size the model takes", path)
            return cls(size=_model_size(path.parent / "config.json"))
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(data, where=str(path))

    def sized_for(self, config: Mapping[str, Any]) -> ImageProcessing:
        """These settings for a model of ``config``: the size filled in from its ``image_size``, or
        checked against it (SpecError when the model takes another size)."""
        side = config.get("image_size")
        if not isinstance(side, int) or side < 1:
            raise SpecError("this model takes no images (its config has no image_size): image data cannot train it")
        if self.size is None:
            return replace(self, size=(side, side))
        if self.size != (side, side):
            raise SpecError(
                f"the images are preprocessed to {self.size[0]}x{self.size[1]} but the model takes {side}x{side}:"
                " pass the model's preprocessor_config.json"
            )
        return self

    def apply(self, image: Any) -> np.ndarray:
        """One PIL image as float32 ``[3, H, W]``."""
        from PIL import Image

        if self.size is None:
            raise ConfigError("the image size is not known yet: preprocessing needs the model's image_size")
        image = image.convert("RGB")
        if self.do_resize:
            height, width = self.size
            image = image.resize((width, height), resample=getattr(Image.Resampling, _RESAMPLE[self.resample]))
        pixels: np.ndarray = np.asarray(image, dtype=np.float32)
        if self.do_rescale:
            pixels = pixels * np.float32(self.rescale_factor)
        if self.do_normalize:
            pixels = (pixels - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)


def _model_size(config_json: Path) -> tuple[int, int] | None:
    """(image_size, image_size) of a model folder's config.json; None without one."""
    try:
        side = json.loads(config_json.read_text(encoding="utf-8")).get("image_size")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return (side, side) if isinstance(side, int) and 1 <= side <= MAX_SIDE else None


def _size(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, dict) and "height" in value and "width" in value:
        return (int(value["height"]), int(value["width"]))
    if isinstance(value, dict) and "shortest_edge" in value:
        edge = int(value["shortest_edge"])
        return (edge, edge)
    raise ConfigError(f"size must be an integer or {{height, width}}, got {value!r}")


def _triple(value: Any) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) != 3:
        raise ConfigError(f"expected 3 channel values, got {value!r}")
    return (values[0], values[1], values[2])


@dataclass(frozen=True)
class ImageFolder:
    """The files of an image folder: ``(path, label)`` pairs, and the class names (label order)."""

    root: Path
    classes: tuple[str, ...]
    files: tuple[tuple[Path, int], ...]

    def labels(self) -> np.ndarray:
        return np.asarray([label for _, label in self.files], dtype=np.int64)


def read_image_folder(root: str | Path, *, limit: int | None = None, check: bool = True) -> ImageFolder:
    """The images under ``root`` (one sub-folder per class), each opened and checked when ``check``.

    Files are listed class by class, in name order; ``limit`` keeps the first ``limit`` of an
    interleaved order (one of each class in turn), so a cut keeps every class. A class sub-folder may
    be empty (a device without examples of a class keeps its folder, so that the sorted names, and
    the labels, are the same everywhere). ConfigError: not a folder, fewer than 2 class sub-folders,
    no image at all, or an image PIL cannot read (naming it).
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise ConfigError(f"{base} is not a folder of class sub-folders (one per class, images inside)")
    classes = tuple(sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if len(classes) < 2:
        raise ConfigError(f"{base}: an image folder needs a sub-folder per class (at least 2), found {len(classes)}")
    per_class = []
    for label, name in enumerate(classes):
        found = sorted(
            p
            for p in (base / name).iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        per_class.append([(p, label) for p in found])
    if not any(per_class):
        raise ConfigError(f"{base}: no images in its class sub-folders (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    files = _interleaved(per_class)[:limit] if limit else [f for group in per_class for f in group]
    if check:
        for path, _ in files:
            _check_image(path)
    return ImageFolder(root=base, classes=classes, files=tuple(files))


def _interleaved(groups: Sequence[Sequence[tuple[Path, int]]]) -> list[tuple[Path, int]]:
    out: list[tuple[Path, int]] = []
    for i in range(max(len(g) for g in groups)):  # groups: at least one non-empty
        out.extend(g[i] for g in groups if i < len(g))
    return out


def _open(path: Path) -> Any:
    """The decoded image at ``path``; ConfigError naming the file when PIL cannot read it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise ConfigError(f"cannot read the image {path}: {type(exc).__name__}: {exc}") from None


def _check_image(path: Path) -> None:
    """Decode ``path`` once (a JPEG at 1/8 scale: the whole stream is read, a truncated file fails)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ConfigError(f"cannot read the image {path}: {type(exc).__name__}: {exc}") from None


class ImageDataset:
    """An image folder as a BatchSource: ``{"pixel_values": float32 [b, 3, H, W], "labels": int64 [b]}``.

    ``processing``: the preprocessing (default: :meth:`ImageProcessing.from_model_dir` of
    ``processor_dir``, else the defaults with the model's size). ``holdout``: the last ``holdout``
    images are held back (never trained on nor counted in ``len``). ``seq_len`` arguments are
    accepted and ignored: an image's length is fixed by the model.
    """

    def __init__(
        self,
        folder: ImageFolder,
        processing: ImageProcessing | None = None,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        holdout: int = 0,
    ) -> None:
        chosen = [folder.files[int(i)] for i in indices] if indices is not None else list(folder.files)
        if holdout < 0:
            raise ConfigError(f"holdout must be >= 0, got {holdout}")
        if len(chosen) <= holdout:
            raise ConfigError(f"{folder.root} has {len(chosen)} image(s): nothing left to train on")
        cut = len(chosen) - holdout
        self.folder = folder
        self.classes = folder.classes
        self.files = chosen[:cut]
        self.held_out = chosen[cut:]
        self.processing = processing or ImageProcessing()
        self._by_folder = (self.files, self.held_out)  # labels as the folder's sorted sub-folders number them
        self.label_map: LabelMap | None = None

    @classmethod
    def from_folder(
        cls,
        root: str | Path,
        processor_dir: str | Path | None = None,
        *,
        limit: int | None = None,
        holdout: int = 0,
    ) -> ImageDataset:
        """Read and check ``root``; preprocess as ``processor_dir``'s ``preprocessor_config.json`` says."""
        processing = ImageProcessing.from_model_dir(processor_dir)
        return cls(read_image_folder(root, limit=limit), processing, holdout=holdout)

    def __len__(self) -> int:
        return len(self.files)

    def labels(self) -> np.ndarray:
        return np.asarray([label for _, label in self.files], dtype=np.int64)

    def use_labels(self, labels: LabelMap) -> None:
        """Number the classes as the run's ``labels`` do (a sub-folder is matched by its name): a device's
        folder may hold fewer classes, or sort them differently, than the coordinator's. A sub-folder
        with images whose name is not in the map is a ConfigError naming it, before any training."""
        if labels == self.label_map:
            return
        used = {label for _, label in (*self._by_folder[0], *self._by_folder[1])}
        index: dict[int, int] = {}
        for old, name in enumerate(self.folder.classes):
            new = labels.index(name)
            if new is None and old in used:
                raise ConfigError(
                    f"{self.folder.root / name}: class folder {name!r} is not one of the run's {labels.describe()}"
                )
            index[old] = -1 if new is None else new
        self.files, self.held_out = ([(path, index[old]) for path, old in part] for part in self._by_folder)
        self.classes = tuple(labels.names)
        self.label_map = labels

    def fit_model(self, config: Mapping[str, Any]) -> None:
        """Check (or fill in) the preprocessing for the model of ``config`` and its label count."""
        self.processing = self.processing.sized_for(config)
        labels = config.get("num_labels") or len(config.get("id2label") or {})
        if isinstance(labels, int) and labels and len(self.classes) > labels:
            raise SpecError(f"{self.folder.root} has {len(self.classes)} classes but the model has {labels} labels")

    def pixels(self, files: Sequence[tuple[Path, int]]) -> dict[str, np.ndarray]:
        """One batch: the images of ``files`` preprocessed, and their labels."""
        return {
            "pixel_values": np.stack([self.processing.apply(_open(path)) for path, _ in files]),
            "labels": np.asarray([label for _, label in files], dtype=np.int64),
        }

    def batches(self, batch_size: int, seq_len: int = 0, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Endless batches of exactly ``batch_size`` images, reshuffled each pass (``seed`` fixes the order)."""
        rng = random.Random(seed)
        n = len(self.files)
        while True:
            order = list(range(n))
            rng.shuffle(order)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                idx = idx + order[: batch_size - len(idx)] if len(idx) < batch_size else idx
                yield self.pixels([self.files[i] for i in idx])

    def eval_batches(self, batch_size: int, seq_len: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """One pass in order."""
        for start in range(0, len(self.files), batch_size):
            yield self.pixels(self.files[start : start + batch_size])
