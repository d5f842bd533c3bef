"""Run a model over images for the pictures: ``dyntok.show`` for notebooks, and the benchmark's gallery.

:func:`collect` runs ``predict`` batch by batch and keeps what :mod:`.pictures` draws from; :func:`show` adds
finding the images (a split of a dataset, an image folder, or images in memory) and loading a checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from matplotlib.figure import Figure
from torch import Tensor

from ..data import DataConfig, ImageTensorDataset, build_loaders, load_dataset, normalize
from ..data.folder import decode_images, scan_split
from ..data.recorded_split import DEFAULT_HOLDOUT, calibration_split, check_training_set
from ..data.transforms import default_normalization
from ..methods import AdaptiveViT, Prediction, load_model
from ..methods.budget import format_knobs
from ..methods.registry import model_name
from .pictures import Shown, draw_figures, evenly_spaced

__all__ = ["collect", "concat_predictions", "load_images", "show", "write_figures", "entry_gallery",
           "GALLERY_FOLDER"]

#: Sub-folder of a benchmark report holding every entry's pictures.
GALLERY_FOLDER = "gallery"
_SPLITS = ("test", "holdout")


# --------------------------------------------------------------------------------------------- predictions
def concat_predictions(predictions: Sequence[Prediction]) -> Prediction:
    """One prediction from per-batch ones: per-image tensors and per-stage lists of them are concatenated;
    extras without a batch dimension are dropped (they cannot be told apart per image)."""
    first = predictions[0]
    batch = len(first.logits)
    extras = {}
    for key, value in first.extras.items():
        values = [prediction.extras[key] for prediction in predictions]
        if isinstance(value, Tensor) and value.ndim and len(value) == batch:
            extras[key] = torch.cat([v.cpu() for v in values])
        elif isinstance(value, (list, tuple)) and all(isinstance(v, Tensor) and len(v) == batch for v in value):
            extras[key] = [torch.cat([v[stage].cpu() for v in values]) for stage in range(len(value))]
    return Prediction(torch.cat([p.logits.cpu() for p in predictions]), torch.cat([p.macs.cpu() for p in predictions]),
                      extras)


@torch.no_grad()
def collect(model: AdaptiveViT, data: ImageTensorDataset, mean: Sequence[float], std: Sequence[float], *,
            limit: int | None = None, batch_size: int = 128, title: str = "") -> Shown:
    """Predict ``limit`` images spread evenly over ``data`` (all by default); keep what the pictures need.

    Images go through the evaluation transform (resized to the model's input, normalised with ``mean``,
    ``std``); the pictures show them resized the same way, so patch grids line up with what the model saw.
    """
    model.eval()
    device = next(model.parameters()).device
    side = model.input_size[-1]
    if len(data) == 0:
        raise ValueError("no images to show")
    picked = evenly_spaced(torch.arange(len(data)), len(data) if limit is None else limit)
    pictures, predictions = [], []
    for batch in picked.split(batch_size):
        raw = data.images[batch]
        predictions.append(model.predict(normalize(raw, mean, std, side).to(device)))
        pictures.append(normalize(raw, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), side))
    return Shown.from_prediction(torch.cat(pictures), data.labels[picked], concat_predictions(predictions),
                                 data.classes, title)


# --------------------------------------------------------------------------------------------- finding images
def load_images(images: str | os.PathLike | ImageTensorDataset, *, dataset: str = "cifar10",
                data_root: str | None = None, download: bool = False, holdout_size: int | float = DEFAULT_HOLDOUT,
                seed: int = 0, image_size: int | None = None, trained_on: tuple[str, str | None] | None = None
                ) -> tuple[ImageTensorDataset, tuple[float, ...], tuple[float, ...]]:
    """The images to show and their normalisation.

    ``images`` is ``"test"`` or ``"holdout"`` (a split of ``dataset``, the held-out part drawn as
    ``dyntok train`` draws it from ``holdout_size`` and ``seed``), a dataset tree (its test split), a folder
    laid out as ``folder/<class>/<image>``, or an :class:`ImageTensorDataset`. Folders are normalised like
    ``dataset``. ``trained_on`` is ``(checkpoint, fingerprint)`` of the training set a model was trained on:
    held-out images of another training set are refused.
    """
    mean, std = default_normalization(dataset)
    if isinstance(images, ImageTensorDataset):
        return images, mean, std
    if str(images) == "test":
        test = load_dataset(dataset, "test", data_root=data_root, download=download, image_size=image_size)
        return test, mean, std
    if str(images) == "holdout":
        config = DataConfig(dataset=dataset, data_root=data_root, download=download, holdout_size=holdout_size,
                            seed=seed, image_size=image_size)
        loaders = build_loaders(config)
        if trained_on is not None:
            check_training_set(trained_on[1], loaders["fingerprint"], trained_on[0], dataset)
        loader = loaders["holdout"]
        if loader is None:
            raise ValueError("the holdout split is empty: give a holdout size above 0")
        return loader.dataset, loader.transform.mean, loader.transform.std
    folder = Path(images)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images must be one of {', '.join(_SPLITS)} or an image folder; "
                                f"{str(folder)!r} is neither")
    if (folder / "train").is_dir():
        return load_dataset(str(folder), "test", image_size=image_size), mean, std
    split = scan_split(folder)
    pixels = decode_images(split.files, image_size, desc=f"decoding {folder}")
    return ImageTensorDataset(pixels, torch.tensor(split.labels), split.classes, f"image folder {folder}"), mean, std


# --------------------------------------------------------------------------------------------- the entry points
def show(model: AdaptiveViT | str | os.PathLike, images: str | os.PathLike | ImageTensorDataset = "test", *,
         n: int = 32, budget: dict[str, Any] | None = None, calibrate: dict[str, Any] | None = None,
         dataset: str = "cifar10", data_root: str | None = None, download: bool = False,
         holdout_size: int | float | None = None, limit: int | None = None, batch_size: int = 128,
         device: str | torch.device = "cpu") -> dict[str, Figure]:
    """Figures of what ``model`` did with ``images``, by name (see :mod:`dyntok.report.pictures`).

    ``model`` is a model or a saved one's path; ``budget`` sets its knobs first, ``calibrate`` fits them on
    the held-out split of ``dataset`` (e.g. ``{"gmacs": 0.05}`` for DVT's thresholds). GMACs figures cover
    ``limit`` images spread over the split (all by default); image figures show about ``n`` of them.

    For a saved model, the held-out split (for ``calibrate`` and ``images="holdout"``) is the one its
    checkpoint records (:mod:`dyntok.data.recorded_split`): another ``holdout_size``, or a training set other
    than the one it was trained on, is refused. An in-memory model uses ``holdout_size`` (default
    :data:`~dyntok.data.recorded_split.DEFAULT_HOLDOUT`) with seed 0, as a training run's default would.

    >>> figures = dyntok.show("runs/dvt/model.safetensors", "test", calibrate={"gmacs": 0.05}, n=16)
    >>> figures["exits"]  # a matplotlib Figure: displays in a notebook, or .savefig("exits.png")
    """
    split = {"holdout_size": DEFAULT_HOLDOUT if holdout_size is None else holdout_size, "seed": 0}
    trained_on = None
    if not isinstance(model, AdaptiveViT):
        if calibrate is not None or str(images) == "holdout":
            split = calibration_split(model, holdout_size)
            trained_on = (str(model), split.pop("fingerprint"))
        model = load_model(model)
    model = model.to(device).eval()
    if budget:
        model.set_budget(**budget)
    side = model.input_size[-1]
    source = dict(dataset=dataset, data_root=data_root, download=download, image_size=side, trained_on=trained_on,
                  **split)
    if calibrate is not None:
        holdout, mean, std = load_images("holdout", **source)
        model.calibrate(_normalised_batches(holdout, mean, std, side, batch_size, device), **calibrate)
    data, mean, std = load_images(images, **source)
    title = f"{_model_label(model)} on {'images' if isinstance(images, ImageTensorDataset) else Path(images).name}"
    return draw_figures(collect(model, data, mean, std, limit=limit, batch_size=batch_size, title=title), n)


def _normalised_batches(data: ImageTensorDataset, mean, std, side: int, batch_size: int, device):
    for start in range(0, len(data), batch_size):
        yield (normalize(data.images[start:start + batch_size], mean, std, side).to(device),
               data.labels[start:start + batch_size])


def _model_label(model: AdaptiveViT) -> str:
    name = model_name(model.method_name, model.config["backbone"]["name"])
    budget = model.get_budget()
    return f"{name} ({format_knobs(budget)})" if budget else name


def write_figures(figures: dict[str, Figure], folder: str | os.PathLike) -> list[Path]:
    """Save each figure as ``folder/<name>.png``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, figure in figures.items():
        paths.append(folder / f"{name}.png")
        figure.savefig(paths[-1])
    return paths


# --------------------------------------------------------------------------------------------- the benchmark
def entry_gallery(model: AdaptiveViT, points: Sequence[dict[str, Any]], loader, report_folder: str | os.PathLike,
                  name: str, images: int = 256, n: int = 8) -> dict[str, Any]:
    """A benchmark entry's pictures at its middle budget point (by GMACs), under ``report/gallery/<name>/``.

    ``points`` are the entry's measured points (``label``, ``knobs``, ``mean_gmacs``); ``loader`` the test
    loader. The GMACs figures cover ``images`` test images spread over the split. Returns
    ``{"label", "figures"}``, figure paths relative to the report folder, for ``results.json`` and the
    leaderboard's links.
    """
    point = sorted(points, key=lambda p: p["mean_gmacs"])[len(points) // 2]
    model.set_budget(**point["knobs"])
    shown = collect(model, loader.dataset, loader.transform.mean, loader.transform.std, limit=images,
                    title=f"{name} ({point['label']})")
    folder = Path(report_folder) / GALLERY_FOLDER / name
    paths = write_figures(draw_figures(shown, n), folder)
    return {"label": point["label"],
            "figures": {path.stem: path.relative_to(report_folder).as_posix() for path in paths}}
