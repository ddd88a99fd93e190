"""The built-in datasets of ``sam-optax compare``: generated or read locally, no network."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

DATASETS = ("mnist1d", "digits")
NUM_CLASSES = 10


@functools.cache
def _mnist1d() -> tuple[np.ndarray, ...]:
    from mnist1d.data import get_dataset_args, make_dataset

    # Generated locally from the package's templates (never its download path).
    data = make_dataset(get_dataset_args())
    return (
        np.asarray(data["x"], np.float32),
        np.asarray(data["y"], np.int32),
        np.asarray(data["x_test"], np.float32),
        np.asarray(data["y_test"], np.int32),
    )


@functools.cache
def _digits() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        (x / 16.0).astype(np.float32), y.astype(np.int32), test_size=0.2, random_state=0, stratify=y
    )
    return x_train, y_train, x_test, y_test


_LOADERS: dict[str, Callable[[], tuple[np.ndarray, ...]]] = {
    "mnist1d": _mnist1d,
    "digits": _digits,
}


def check_dataset(name: Any) -> None:
    """Rejects a dataset name that is not one of :data:`DATASETS`."""
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


def check_label_noise(label_noise: Any) -> None:
    """Rejects a label-noise fraction outside ``[0, 1)``."""
    if isinstance(label_noise, bool) or not (
        isinstance(label_noise, int | float) and 0.0 <= label_noise < 1.0
    ):
        raise ValueError(f"label noise must be a fraction in [0, 1), got {label_noise!r}")


def add_label_noise(labels: np.ndarray, fraction: float, *, seed: int = 0) -> np.ndarray:
    """Flips ``round(fraction · n)`` labels, chosen at random, to another class.

    Each chosen label moves to a class drawn uniformly from the
    ``NUM_CLASSES - 1`` other classes, so exactly that fraction of labels is wrong.

    Args:
      labels: integer labels in ``[0, NUM_CLASSES)``.
      fraction: the fraction of labels to flip, in ``[0, 1)``.
      seed: the seed of the choice (fixed, so every method sees the same labels).

    Returns:
      A new label array.

    Examples:
      >>> import numpy as np
      >>> from sam_optax.compare import add_label_noise
      >>> y = np.zeros(10, np.int32)
      >>> int((add_label_noise(y, 0.4) != y).sum())
      4
    """
    check_label_noise(fraction)
    rng = np.random.default_rng(seed)
    labels = np.array(labels, copy=True)
    flip = rng.choice(labels.shape[0], round(fraction * labels.shape[0]), replace=False)
    shift = rng.integers(1, NUM_CLASSES, flip.shape[0])
    labels[flip] = (labels[flip] + shift) % NUM_CLASSES
    return labels


def load_dataset(name: str, *, label_noise: float = 0.0, seed: int = 0) -> dict[str, np.ndarray]:
    """Loads a built-in dataset, generated or read locally with no network.

    ``mnist1d``: the MNIST-1D generator's default dataset (4000 train and 1000
    test sequences of length 40, 10 classes), generated once per process.
    ``digits``: scikit-learn's bundled 8×8 digits, scaled to ``[0, 1]`` and split
    80/20 (stratified, fixed). Label noise touches training labels only.

    Args:
      name: one of :data:`DATASETS`.
      label_noise: the fraction of training labels flipped to another class
        (see :func:`add_label_noise`), in ``[0, 1)``.
      seed: the seed of the label noise.

    Returns:
      ``dict(x_train, y_train, x_test, y_test)`` of NumPy arrays (float32 inputs
      ``[N, features]``, int32 labels).

    Examples:
      >>> from sam_optax.compare import load_dataset
      >>> data = load_dataset("digits", label_noise=0.1)
      >>> data["x_train"].shape, data["x_test"].shape
      ((1437, 64), (360, 64))

    References:
      Greydanus & Kobak, Scaling Down Deep Learning with MNIST-1D, ICML 2024,
      https://arxiv.org/abs/2011.14439
    """
    check_dataset(name)
    check_label_noise(label_noise)
    x_train, y_train, x_test, y_test = _LOADERS[name]()
    if label_noise > 0:
        y_train = add_label_noise(y_train, label_noise, seed=seed)
    return {
        "x_train": x_train.copy(),
        "y_train": np.array(y_train, copy=True),
        "x_test": x_test.copy(),
        "y_test": y_test.copy(),
    }


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """Indices ``[steps, batch_size]``: epochs of shuffled, full batches."""
    rng = np.random.default_rng(seed)
    per_epoch = max(1, n // batch_size)
    epochs = -(-steps // per_epoch)
    order = [rng.permutation(n)[: per_epoch * batch_size] for _ in range(epochs)]
    return np.concatenate(order).reshape(-1, batch_size)[:steps].astype(np.int32)
