"""A small trainer: quantize -> search -> freeze -> finetune -> evaluate, with exact resume.

``fit(model, train_loader, val_loader, mpq_config, FitConfig(...))`` runs the whole pipeline of
one method at one budget:

1. ``quantize_`` (unless the model is already quantized), calibrated on a fixed first batch;
2. search: task loss + ``MPQSearch.penalty()``, ``search.step()`` after each optimizer step
   (fixed-bit methods such as ``lsq`` train plain QAT here: no penalty);
3. ``search.freeze(strict=True)`` -> :class:`~mpq_plugin.config.BitPlan` (raises ``BudgetError`` if
   the searched bits miss the budget);
4. finetune at the frozen bits: knowledge distillation from the float teacher's logits (``kd``) and
   Entropy-aware Bin Regularization (``ebr_lambda``, SDQ's stage 2);
5. evaluation on ``val_loader`` and the achieved cost.

Resume is exact: a checkpoint holds model, optimizer, scheduler and search state, the phase and
step, the torch/numpy/python RNG states and the data order. The train data is replayed through a
sampler whose permutation depends only on ``(seed, epoch)``, so a run resumed mid-epoch skips the
batches it already consumed and its next loss equals the uninterrupted run's bit for bit.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Sampler

from mpq_plugin.config import BitPlan, MPQConfig
from mpq_plugin.nn.costing import model_cost
from mpq_plugin.nn.fake_quantizer import FakeQuantizer
from mpq_plugin.nn.layers import quant_layers
from mpq_plugin.registry import get_method

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["FitConfig", "FitResult", "TrainingDiverged", "EpochSampler", "check_model_fits", "evaluate", "fit",
           "make_adam", "optimizer_param_groups", "train_float",
           "load_checkpoint", "CHECKPOINT_NAME"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the message names the step, the phase and what to try."""


# -- configuration ---------------------------------------------------------------------------------
_CHOICES = {"optimizer": ("adam", "sgd"), "lr_schedule": ("cosine", "constant")}
# fields that do not change the training trajectory: they may differ between a run and its resume
_RUNTIME_FIELDS = frozenset({"run_dir", "checkpoint_every", "log_every", "progress_bar"})


@dataclass(frozen=True)
class FitConfig:
    """How :func:`fit` trains; validated at construction.

    Attributes:
        search_steps / finetune_steps: optimizer steps of each phase; when ``None`` the phase
            runs ``search_epochs`` / ``finetune_epochs`` passes over the train loader.
        lr, weight_decay, optimizer (``adam`` | ``sgd``), momentum (sgd): the optimizer.
            Weight decay applies to the model's own parameters, not to quantizer parameters.
        quantizer_lr_mult: learning-rate multiplier of quantizer parameters (steps, bit
            parameters; CSQ's bit planes too, since they are its weight).
        bit_lr: learning rate of the parameters a quantizer lists in its optional
            ``bit_parameters()`` (SDQ's bit probabilities, which must travel from 1 to the decay
            threshold once per candidate); ``None``: the quantizer learning rate.
        lr_schedule: ``cosine`` (to 0 over each phase) or ``constant``.
        kd: distill from a float teacher's logits in the finetune phase (default teacher: a
            frozen copy of the float model taken before quantization).
        kd_temperature: softmax temperature of the distillation loss.
        kd_alpha: finetune loss = ``kd_alpha * KD + (1 - kd_alpha) * task loss`` (1.0: KD only,
            as in SDQ's stage 2).
        ebr_lambda: weight of Entropy-aware Bin Regularization in the finetune phase; ``None``
            means 0.1 for ``sdq`` (best in the paper's ablation) and 0 for other methods.
        max_grad_norm: clip the gradient norm (``None``: no clipping).
        formulation, lam, warmup_steps, ramp_steps, adaptive: passed to ``MPQSearch``.
        strict_budget: ``search.freeze(strict=...)``: fail when the searched bits miss the budget.
        freeze_fill: ``search.freeze(fill=...)``: raise bits that still fit the budget after the
            search (``None``: the searcher's default, ``False``: keep the searched bits as learned).
        checkpoint_every: save ``run_dir/checkpoint.pt`` every N steps (0: only at the end, on
            Ctrl-C and at ``stop_at_step``). Needs ``run_dir``.
        run_dir: where checkpoints and the frozen plan go (``None``: nothing is written).
        seed: seeds torch/numpy/python and the data order.
        group_by_length: batch samples of similar length together (Hugging Face's option of that
            name; see :class:`EpochSampler`): text batches pad less, a step costs less.
        log_every: log a line every N steps.
        progress_bar: tqdm bar; ``None`` shows it only on a terminal.
    """

    search_steps: Optional[int] = None
    search_epochs: float = 1.0
    finetune_steps: Optional[int] = None
    finetune_epochs: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    momentum: float = 0.9
    quantizer_lr_mult: float = 1.0
    bit_lr: Optional[float] = None
    lr_schedule: str = "cosine"
    kd: bool = True
    kd_temperature: float = 1.0
    kd_alpha: float = 1.0
    ebr_lambda: Optional[float] = None
    max_grad_norm: Optional[float] = None
    formulation: Optional[str] = None
    lam: Optional[float] = None
    warmup_steps: int = 0
    ramp_steps: int = 0
    adaptive: bool = True
    strict_budget: bool = True
    freeze_fill: Optional[bool] = None
    checkpoint_every: int = 0
    run_dir: Optional[str] = None
    seed: int = 0
    group_by_length: bool = False
    log_every: int = 50
    progress_bar: Optional[bool] = None

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_field(f.name, getattr(self, f.name), f.type)
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"FitConfig.{name}={getattr(self, name)!r}; allowed: {list(allowed)}")
        for name in ("search_steps", "finetune_steps", "warmup_steps", "ramp_steps", "checkpoint_every",
                     "search_epochs", "finetune_epochs", "weight_decay", "ebr_lambda", "lam"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"FitConfig.{name}={v!r} must be >= 0")
        for name in ("lr", "kd_temperature", "log_every", "quantizer_lr_mult", "max_grad_norm", "bit_lr"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"FitConfig.{name}={v!r} must be > 0")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ValueError(f"FitConfig.kd_alpha={self.kd_alpha!r} must be in [0, 1]")
        if self.run_dir is not None:
            object.__setattr__(self, "run_dir", str(self.run_dir))

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> "FitConfig":
        """Build from a mapping; unknown keys raise ``ValueError`` listing the allowed ones."""
        d = dict(d or {})
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"unknown FitConfig key(s) {unknown}; allowed: {sorted(allowed)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "FitConfig":
        return dataclasses.replace(self, **changes)


_TYPE_CHECKS: Dict[str, Tuple[Tuple[type, ...], str]] = {
    "int": ((int,), "an integer"),
    "float": ((int, float), "a number"),
    "bool": ((bool,), "true or false"),
    "str": ((str,), "a string"),
}


def _check_field(name: str, value: Any, annotation: Any) -> None:
    ann = str(annotation)
    optional = ann.startswith("Optional[")
    base = ann[len("Optional["):-1] if optional else ann
    if value is None:
        if optional:
            return
        raise TypeError(f"FitConfig.{name} must not be None")
    types, what = _TYPE_CHECKS[base]
    ok = isinstance(value, types) and (base == "bool" or not isinstance(value, bool))
    if base == "float" and ok and not math.isfinite(float(value)):
        ok = False
    if not ok:
        raise TypeError(f"FitConfig.{name} must be {what}{' or null' if optional else ''}, got {value!r}")


# -- data order ------------------------------------------------------------------------------------
class EpochSampler(Sampler):  # type: ignore[type-arg]
    """A permutation of ``range(n)`` that depends only on ``(seed, epoch)``, from position ``start``.

    Replaying epoch ``e`` from ``start = k * batch_size`` yields exactly the batches an
    uninterrupted run sees after its first ``k`` batches of that epoch.

    With ``lengths`` (one per sample) and ``batch_size`` the permutation is grouped by length, as
    Hugging Face's ``group_by_length``: the shuffled indices are cut into mega-batches of
    ``mega * batch_size``, each sorted by length, cut into batches, and the full batches are
    shuffled (the partial last one stays last, so ``drop_last`` still drops it). A batch then
    holds texts of similar length and pads little; which texts meet in a batch stays random.
    """

    def __init__(self, n: int, seed: int, epoch: int, start: int = 0, lengths: Optional[List[int]] = None,
                 batch_size: int = 1, mega: int = 50) -> None:
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} samples")
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start
        self.lengths, self.batch_size, self.mega = lengths, batch_size, mega

    def permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=g)
        if self.lengths is None:
            return perm
        lengths = torch.as_tensor(self.lengths)
        size = self.mega * self.batch_size
        grouped = [m[torch.argsort(lengths[m], descending=True, stable=True)] for m in perm.split(size)]
        batches = list(torch.cat(grouped).split(self.batch_size))
        full = batches if len(batches[-1]) == self.batch_size else batches[:-1]
        order = torch.randperm(len(full), generator=g).tolist()
        return torch.cat([full[i] for i in order] + batches[len(full):])

    def __iter__(self) -> Iterator[int]:
        return iter(self.permutation()[self.start:].tolist())

    def __len__(self) -> int:
        return max(self.n - self.start, 0)


def sample_lengths(dataset: Any) -> List[int]:
    """Per-sample lengths for ``group_by_length``: ``dataset.lengths`` when it has them, else
    ``len()`` of each sample (of its first field when it is a tuple: ``(token_ids, target)``)."""
    lengths = getattr(dataset, "lengths", None)
    if lengths is not None:
        return [int(x) for x in lengths]
    def first_field(sample: Any) -> Any:
        return sample[0] if isinstance(sample, tuple) else sample

    try:
        return [len(first_field(dataset[i])) for i in range(len(dataset))]
    except TypeError as e:
        raise ValueError("group_by_length needs per-sample lengths: give the dataset a `lengths` attribute "
                         "(one int per sample) or make each sample's first field a sequence of token ids") from e


def _mix(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + 17) % (2**63 - 1)


class _DataStream:
    """Endless stream of train batches; position ``step`` maps to ``(epoch, batch)``."""

    def __init__(self, loader: DataLoader, seed: int, group_by_length: bool = False) -> None:
        if not isinstance(loader, DataLoader):
            raise TypeError(f"train_loader must be a torch DataLoader, got {type(loader).__name__}")
        if isinstance(loader.dataset, IterableDataset):
            raise ValueError("train_loader uses an IterableDataset; fit needs a map-style dataset "
                             "(with __len__ and __getitem__) to replay the data order on resume")
        if loader.batch_size is None:
            raise ValueError("train_loader has a custom batch_sampler; give it batch_size= and "
                             "shuffle= instead so fit can replay its order on resume")
        self.loader, self.seed = loader, seed
        self.n = len(loader.dataset)  # type: ignore[arg-type]
        self.batch_size = int(loader.batch_size)
        per_epoch = self.n // self.batch_size if loader.drop_last else math.ceil(self.n / self.batch_size)
        if per_epoch == 0:
            raise ValueError(
                f"train_loader yields no batches (dataset has {self.n} samples, batch_size="
                f"{self.batch_size}, drop_last={loader.drop_last}); give it data or a smaller batch_size"
            )
        self.steps_per_epoch = per_epoch
        self.lengths = sample_lengths(loader.dataset) if group_by_length else None
        self._it: Optional[Iterator[Any]] = None
        self._pos = -1

    def position(self, step: int) -> Tuple[int, int]:
        return divmod(step, self.steps_per_epoch)

    def _epoch_loader(self, epoch: int, batch: int) -> DataLoader:
        ld = self.loader
        return DataLoader(
            ld.dataset, batch_size=self.batch_size, drop_last=ld.drop_last,
            sampler=EpochSampler(self.n, self.seed, epoch, batch * self.batch_size, self.lengths, self.batch_size),
            collate_fn=ld.collate_fn, num_workers=ld.num_workers, pin_memory=ld.pin_memory,
            worker_init_fn=ld.worker_init_fn,
            # its own generator: creating an iterator must not consume the global torch RNG
            generator=torch.Generator().manual_seed(_mix(self.seed, epoch) + batch),
        )

    def batch_at(self, step: int) -> Any:
        """The batch of global step ``step`` (sequential calls reuse one iterator per epoch)."""
        epoch, batch = self.position(step)
        if self._it is None or step != self._pos + 1 or batch == 0:
            self._it = iter(self._epoch_loader(epoch, batch))
        self._pos = step
        return next(self._it)


# -- batches, losses, evaluation ------------------------------------------------------------------
def _split_batch(batch: Any) -> Tuple[Tuple[Any, ...], Any]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x = batch[0]
        return (tuple(x) if isinstance(x, (tuple, list)) else (x,)), batch[1]
    raise ValueError(
        f"each batch must be (inputs, targets) (a tuple or list of length >= 2), got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    return obj


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, loss_fn: LossFn = F.cross_entropy) -> Dict[str, Optional[float]]:
    """Mean loss and, for ``(batch, classes)`` outputs with integer targets, top-1 accuracy.

    Returns ``{"loss": .., "accuracy": ..(or None), "samples": n}``; restores the model's mode.
    """
    was_training = model.training
    model.eval()
    device = _model_device(model)
    total, loss_sum, correct, classify = 0, 0.0, 0, True
    try:
        for batch in loader:
            inputs, y = _split_batch(batch)
            inputs, y = _to(inputs, device), _to(y, device)
            out = model(*inputs)
            n = int(y.shape[0]) if isinstance(y, torch.Tensor) and y.dim() > 0 else 1
            loss_sum += float(loss_fn(out, y)) * n
            total += n
            if classify and isinstance(out, torch.Tensor) and out.dim() == 2 and isinstance(y, torch.Tensor) \
                    and y.dim() == 1 and not y.is_floating_point():
                correct += int((out.argmax(dim=1) == y).sum())
            else:
                classify = False
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("val_loader yields no batches; give it data (or pass val_loader=None)")
    return {"loss": loss_sum / total, "accuracy": correct / total if classify else None, "samples": float(total)}


def _check_batch(model: nn.Module, teacher: Optional[nn.Module], inputs: Tuple[Any, ...], y: Any,
                 loss_fn: LossFn) -> None:
    """One no-grad forward: the outputs must fit the loss (and the teacher's outputs)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                out = model(*inputs)
            except (RuntimeError, ValueError, IndexError, TypeError) as e:
                raise ValueError(
                    f"the model fails on the first training batch (inputs {', '.join(_describe(x) for x in inputs)}): "
                    f"{e}. Check that the data matches the model (channels, image size, dtype)"
                ) from None
            try:
                loss = loss_fn(out, y)
            except (RuntimeError, ValueError, IndexError, TypeError) as e:
                raise ValueError(
                    f"the model's outputs do not match the loss: outputs {_describe(out)}, targets "
                    f"{_describe(y)}; {getattr(loss_fn, '__name__', 'loss_fn')} failed with: {e}. Check "
                    "the model's number of outputs (e.g. num_classes) against the labels"
                ) from None
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(f"loss_fn must return a scalar tensor, got {_describe(loss)}")
            if teacher is not None:
                t = teacher(*inputs)
                if not isinstance(t, torch.Tensor) or not isinstance(out, torch.Tensor) or t.shape != out.shape:
                    raise ValueError(f"teacher outputs {_describe(t)} do not match the model's outputs "
                                     f"{_describe(out)}; distillation needs the same logits shape")
    finally:
        model.train(was_training)


def check_model_fits(model: nn.Module, batch: Any, loss_fn: LossFn = F.cross_entropy) -> None:
    """Raise ``ValueError`` when ``model`` cannot run on ``batch = (inputs, targets)`` or its
    outputs do not fit ``loss_fn`` (one no-grad forward in eval mode)."""
    inputs, y = _split_batch(batch)
    device = _model_device(model)
    _check_batch(model, None, _to(inputs, device), _to(y, device), loss_fn)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"of shape {tuple(x.shape)} ({str(x.dtype).replace('torch.', '')})"
    return f"of type {type(x).__name__}"


# -- RNG and checkpoints -----------------------------------------------------------------------------
def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(run_dir: str | Path) -> Dict[str, Any]:
    """Load ``run_dir/checkpoint.pt`` (tensors and plain Python values only)."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


class _DeferSigint:
    """Turn Ctrl-C into a flag checked between steps, so the checkpoint is a consistent state.

    A second Ctrl-C interrupts at once. Only possible in the main thread; elsewhere a no-op.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> "_DeferSigint":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt received: finishing the current step, then saving a checkpoint "
                    "(press Ctrl-C again to stop at once)")

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# -- result ----------------------------------------------------------------------------------------
@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        plan: the frozen :class:`BitPlan` (``None`` if the run stopped before the freeze).
        metrics: ``accuracy``, ``val_loss`` and the achieved cost (``avg_weight_bits``,
            ``weight_kb``, ``act_kb_sum``, ``act_kb_max``, ``bops``, ``float_weight_kb``).
        history: the search's per-step records (``MPQSearch.history``).
        losses: training loss per completed step.
        search_seconds / finetune_seconds: wall time of each phase (summed over resumes).
        completed: ``False`` when the run stopped early (``stop_at_step``).
        steps: completed steps; total_steps: steps of the whole run.
    """

    plan: Optional[BitPlan]
    metrics: Dict[str, Any] = field(default_factory=dict)
    history: List[Dict[str, Any]] = field(default_factory=list)
    losses: List[float] = field(default_factory=list)
    search_seconds: float = 0.0
    finetune_seconds: float = 0.0
    completed: bool = True
    steps: int = 0
    total_steps: int = 0
    run_dir: Optional[str] = None


# -- the trainer -----------------------------------------------------------------------------------
def _is_quantized(model: nn.Module) -> bool:
    return next(quant_layers(model), None) is not None


def _phase_steps(steps: Optional[int], epochs: float, per_epoch: int) -> int:
    return int(steps) if steps is not None else int(round(epochs * per_epoch))


def _resolve_ebr(cfg: FitConfig, method: str) -> float:
    if cfg.ebr_lambda is not None:
        return float(cfg.ebr_lambda)
    return 0.1 if method == "sdq" else 0.0


def optimizer_param_groups(model: nn.Module, *, lr: float, weight_decay: float = 0.0,
                           quantizer_lr_mult: float = 1.0, bit_lr: Optional[float] = None,
                           no_decay: Optional[Any] = None) -> List[Dict[str, Any]]:
    """Optimizer parameter groups of a quantized model (trainable parameters only, empty groups dropped).

    * model weights: ``lr`` and ``weight_decay`` (names in ``no_decay``, e.g. biases and norms as
      HF's Trainer excludes them, get no weight decay; a fourth group);
    * quantizer parameters (steps, ranges; CSQ's bit planes): ``lr * quantizer_lr_mult``, no decay;
    * the parameters quantizers list in their optional ``bit_parameters()`` (SDQ's betas, CSQ's
      mask logits): ``bit_lr``, no decay (``None``: they stay in the quantizer group).

    Each group carries ``"name"``: ``weights``, ``weights_no_decay``, ``quantizer`` or ``bits``.
    """
    quantizers = [m for m in model.modules() if isinstance(m, FakeQuantizer)]
    qids = {id(p) for m in quantizers for p in m.parameters()}
    bids = set()
    if bit_lr is not None:  # optional hook: a quantizer may list its bit-width parameters
        bids = {id(p) for m in quantizers if callable(getattr(m, "bit_parameters", None))
                for p in m.bit_parameters()}
    skip_decay = set(no_decay or ())
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    weights = [(n, p) for n, p in named if id(p) not in qids]
    groups = [
        {"name": "weights", "params": [p for n, p in weights if n not in skip_decay], "lr": lr,
         "weight_decay": weight_decay},
        {"name": "weights_no_decay", "params": [p for n, p in weights if n in skip_decay], "lr": lr,
         "weight_decay": 0.0},
        {"name": "quantizer", "params": [p for _, p in named if id(p) in qids and id(p) not in bids],
         "lr": lr * quantizer_lr_mult, "weight_decay": 0.0},
        {"name": "bits", "params": [p for _, p in named if id(p) in bids], "lr": bit_lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


_FUSED_DEVICES = ("cpu", "cuda")


def make_adam(params: Any, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """``torch.optim.Adam``, fused (one kernel pass per tensor) when every parameter allows it.

    torch's default on the CPU is the ``foreach`` form, several passes over every state tensor; the
    fused form is 6x faster here (22M parameters: 15 vs 88 ms per step; CSQ's bit planes of a
    MiniLM, 300M parameters: 0.2 vs 1.2 s) with the same update to float rounding. Parameters of
    other devices or non-float dtypes get the default form.
    """
    groups = list(params)
    flat = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(flat) and all(p.device.type in _FUSED_DEVICES and p.dtype in (torch.float32, torch.float64,
                                                                                 torch.float16, torch.bfloat16)
                               for p in flat) and len({p.device for p in flat}) == 1
    return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)


class _Trainer:
    """State of one :func:`fit` call (kept in one object so checkpoints see all of it)."""

    def __init__(self, model: nn.Module, stream: _DataStream, mpq_config: MPQConfig, cfg: FitConfig,
                 teacher: Optional[nn.Module], loss_fn: LossFn, teacher_owned: bool) -> None:
        self.model, self.stream, self.mpq_config, self.cfg = model, stream, mpq_config, cfg
        self.teacher, self.loss_fn, self.teacher_owned = teacher, loss_fn, teacher_owned
        self.device = _model_device(model)
        self.method = mpq_config.method
        self.searches = bool(get_method(self.method).quantizer_cls.searches_bits)
        spe = stream.steps_per_epoch
        self.search_total = _phase_steps(cfg.search_steps, cfg.search_epochs, spe)
        self.finetune_total = _phase_steps(cfg.finetune_steps, cfg.finetune_epochs, spe)
        self.total = self.search_total + self.finetune_total
        self.ebr = _resolve_ebr(cfg, self.method)
        self.step = 0
        self.frozen = False
        self.plan: Optional[BitPlan] = None
        self.search: Any = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler: Any = None
        self.opt_phase: Optional[str] = None
        self.losses: List[float] = []
        self.last_finite: Optional[Tuple[int, float]] = None
        self.seconds = {"search": 0.0, "finetune": 0.0}
        self.run_dir = Path(cfg.run_dir) if cfg.run_dir is not None else None
        self.in_step = False

    # phases
    def phase_of(self, step: int) -> str:
        return "search" if step < self.search_total else "finetune"

    def make_search(self) -> None:
        if not self.searches or self.search_total == 0:
            return
        from mpq_plugin.search.searcher import MPQSearch

        c = self.cfg
        self.search = MPQSearch(self.model, self.mpq_config.budget, total_steps=self.search_total,
                                formulation=c.formulation, lam=c.lam, warmup_steps=c.warmup_steps,
                                ramp_steps=c.ramp_steps, adaptive=c.adaptive)

    def enter_phase(self, phase: str) -> None:
        if phase == "finetune" and not self.frozen:
            self.freeze_now()
        self.optimizer = self.make_optimizer()
        n = self.search_total if phase == "search" else self.finetune_total
        self.scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(n, 1))
                          if self.cfg.lr_schedule == "cosine" else None)
        self.opt_phase = phase

    def freeze_now(self) -> None:
        if self.search is not None:
            self.plan = self.search.freeze(strict=self.cfg.strict_budget, fill=self.cfg.freeze_fill)
        else:
            from mpq_plugin.api import freeze as fix_all  # api sits beside search in the dependency rule

            if self.searches and self.search_total == 0:
                log.warning("search_steps=0: freezing %s at its initial bit-widths", self.method)
            self.plan = fix_all(self.model)
        self.frozen = True
        log.info("frozen: avg weight bits %.3f over %d layers", self.plan.avg_weight_bits(), len(self.plan))
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.plan.save(self.run_dir / "plan.json")

    def make_optimizer(self) -> torch.optim.Optimizer:
        c = self.cfg
        groups = optimizer_param_groups(self.model, lr=c.lr, weight_decay=c.weight_decay,
                                        quantizer_lr_mult=c.quantizer_lr_mult, bit_lr=c.bit_lr)
        if c.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum)
        return make_adam(groups, lr=c.lr)

    # checkpoints
    def state(self) -> Dict[str, Any]:
        epoch, batch = self.stream.position(self.step)
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step, "total_steps": self.total, "phase": self.phase_of(self.step),
            "frozen": self.frozen, "plan": self.plan.to_json() if self.plan is not None else None,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "optimizer_phase": self.opt_phase,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "search": self.search.state_dict() if self.search is not None else None,
            "teacher": self.teacher.state_dict() if self.teacher is not None and self.teacher_owned else None,
            "rng": _rng_state(),
            "data": {"seed": self.cfg.seed, "epoch": epoch, "batch": batch,
                     "steps_per_epoch": self.stream.steps_per_epoch, "dataset_len": self.stream.n,
                     "batch_size": self.stream.batch_size},
            "losses": list(self.losses),
            "last_finite": list(self.last_finite) if self.last_finite else None,
            "seconds": dict(self.seconds),
            "fit_config": self.cfg.to_dict(), "mpq_config": self.mpq_config.to_json(),
            "result": None,
        }

    def save(self, result: Optional[Dict[str, Any]] = None) -> Optional[Path]:
        if self.run_dir is None:
            return None
        st = self.state()
        st["result"] = result
        path = self.run_dir / CHECKPOINT_NAME
        _atomic_save(st, path)
        log.debug("checkpoint saved at step %d: %s", self.step, path)
        return path

    def restore(self, ck: Mapping[str, Any]) -> None:
        self.check_compatible(ck)
        self.model.load_state_dict(ck["model"])
        if ck["teacher"] is not None and self.teacher is not None:
            self.teacher.load_state_dict(ck["teacher"])
        self.step, self.frozen = int(ck["step"]), bool(ck["frozen"])
        self.plan = BitPlan.from_json(ck["plan"]) if ck["plan"] else None
        if self.search is not None and ck["search"] is not None:
            self.search.load_state_dict(ck["search"])
        self.losses = list(ck["losses"])
        self.last_finite = tuple(ck["last_finite"]) if ck["last_finite"] else None  # type: ignore[assignment]
        self.seconds = dict(ck["seconds"])
        if self.step < self.total:
            phase = self.phase_of(self.step)
            self.enter_phase(phase)
            if ck["optimizer_phase"] == phase and ck["optimizer"] is not None:
                self.optimizer.load_state_dict(ck["optimizer"])  # type: ignore[union-attr]
                if self.scheduler is not None and ck["scheduler"] is not None:
                    self.scheduler.load_state_dict(ck["scheduler"])
        _set_rng_state(ck["rng"])
        log.info("resumed from step %d/%d (%s phase)", self.step, self.total, self.phase_of(self.step))

    def check_compatible(self, ck: Mapping[str, Any]) -> None:
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {ck.get('format')!r} is not {CHECKPOINT_FORMAT}; start a new run")
        if ck["mpq_config"] != self.mpq_config.to_json():
            raise ValueError(f"cannot resume: the checkpoint was made with MPQConfig {ck['mpq_config']}, "
                             f"this run has {self.mpq_config.to_json()}; use the same config or a new run_dir")
        mine = self.cfg.to_dict()
        diff = sorted(k for k, v in ck["fit_config"].items() if k not in _RUNTIME_FIELDS and mine.get(k) != v)
        if diff:
            raise ValueError("cannot resume: FitConfig differs from the checkpoint's in "
                             + ", ".join(f"{k} ({ck['fit_config'][k]!r} -> {mine.get(k)!r})" for k in diff)
                             + "; use the same settings or a new run_dir")
        d = ck["data"]
        if (d["dataset_len"], d["batch_size"]) != (self.stream.n, self.stream.batch_size):
            raise ValueError(f"cannot resume: the checkpoint saw {d['dataset_len']} training samples in batches "
                             f"of {d['batch_size']}, this loader has {self.stream.n} in batches of "
                             f"{self.stream.batch_size}")

    # one step
    def loss_of(self, phase: str, inputs: Tuple[Any, ...], y: Any) -> torch.Tensor:
        out = self.model(*inputs)
        task = self.loss_fn(out, y)
        if phase == "search":
            return task + self.search.penalty() if self.search is not None else task
        loss = task
        if self.teacher is not None and self.cfg.kd:
            from mpq_plugin.search.losses import kd_loss

            with torch.no_grad():
                t = self.teacher(*inputs)
            a = self.cfg.kd_alpha
            kd = kd_loss(out, t, temperature=self.cfg.kd_temperature)
            loss = kd if a == 1.0 else a * kd + (1.0 - a) * task
        if self.ebr > 0:
            from mpq_plugin.search.losses import entropy_aware_bin_regularization

            loss = loss + entropy_aware_bin_regularization(self.model, lam=self.ebr)
        return loss

    def train_step(self, phase: str) -> float:
        self.in_step = True  # model/optimizer/RNG are inconsistent until the step completes
        inputs, y = _split_batch(self.stream.batch_at(self.step))
        inputs, y = _to(inputs, self.device), _to(y, self.device)
        self.model.train()
        loss = self.loss_of(phase, inputs, y)
        value = float(loss.detach())
        if not math.isfinite(value):
            self.diverged(phase, value)
        opt = self.optimizer
        assert opt is not None
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.max_grad_norm is not None:
            nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], self.cfg.max_grad_norm)
        opt.step()
        if phase == "search" and self.search is not None:
            self.search.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        self.losses.append(value)
        self.last_finite = (self.step, value)
        self.in_step = False
        return value

    def diverged(self, phase: str, value: float) -> None:
        last = (f"last finite loss {self.last_finite[1]:.6g} at step {self.last_finite[0]}"
                if self.last_finite else "no finite loss before it")
        ck = ""
        if self.run_dir is not None and (self.run_dir / CHECKPOINT_NAME).is_file():
            ck = f" The last checkpoint in {self.run_dir} was left as it was (nothing new saved)."
        budget = self.mpq_config.budget.to_dict() if self.mpq_config.budget else None
        raise TrainingDiverged(
            f"training diverged at step {self.step + 1}/{self.total} ({phase} phase, method "
            f"{self.method!r}): the loss is {value}; {last}.{ck} Try a lower lr (now {self.cfg.lr:g}), "
            f"max_grad_norm=1.0, or a larger budget (now {budget})."
        )

    def bits_now(self) -> Optional[float]:
        if self.search is not None and getattr(self.search, "history", None):
            h = self.search.history[-1]
            v = h.get("avg_bits", h.get("avg_weight_bits")) if isinstance(h, Mapping) else None
            return float(v) if v is not None else None
        return self.plan.avg_weight_bits() if self.plan is not None else None


def _show_bar(option: Optional[bool]) -> bool:
    if option is not None:
        return option
    return sys.stderr.isatty()


def fit(model: nn.Module, train_loader: DataLoader, val_loader: Optional[Any], mpq_config: MPQConfig,
        fit_config: Optional[FitConfig] = None, *, teacher: Optional[nn.Module] = None,
        loss_fn: LossFn = F.cross_entropy, resume: bool = False,
        stop_at_step: Optional[int] = None) -> FitResult:
    """Search bit-widths under the config's budget, freeze, finetune, evaluate.

    Args:
        model: a float model (quantized here with ``mpq_config``) or one already quantized by
            ``quantize_`` with the same config. Trained in place.
        train_loader: a ``DataLoader`` over a map-style dataset yielding ``(inputs, targets)``; its
            dataset, batch size, collate function and workers are reused, its order is replaced by
            a seeded one (:class:`EpochSampler`) so runs are reproducible and resumable.
        val_loader: any iterable of ``(inputs, targets)`` for the final evaluation, or ``None``.
        mpq_config: method, bit ranges and budget.
        fit_config: a :class:`FitConfig` (default ``FitConfig()``).
        teacher: distillation teacher for the finetune phase (with ``kd``); default: a frozen copy
            of ``model`` taken before quantization.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (default cross entropy).
        resume: continue from ``run_dir/checkpoint.pt`` when it exists (same configs required).
        stop_at_step: stop after this many completed steps (saving a checkpoint), e.g. to split a
            long run into jobs; the result then has ``completed=False``.

    Returns:
        A :class:`FitResult`.

    Raises:
        ValueError: empty loaders, outputs that do not fit the loss, an infeasible budget, a
            checkpoint made with other settings.
        TrainingDiverged: the loss became NaN/Inf (nothing new is saved).
        BudgetError: the searched bits miss the budget (``strict_budget``).
        KeyboardInterrupt: after saving a checkpoint at the last completed step (resume with
            ``resume=True`` / ``mpq ... --resume``).

    Example:
        >>> res = fit(model, train, val, MPQConfig(method="sdq", budget=Budget(avg_weight_bits=3)),
        ...           FitConfig(search_steps=200, finetune_steps=200, run_dir="runs/x"))  # doctest: +SKIP
        >>> res.plan.avg_weight_bits() <= 3.0, res.metrics["accuracy"]                    # doctest: +SKIP
    """
    cfg = fit_config if fit_config is not None else FitConfig()
    if not isinstance(cfg, FitConfig):
        raise TypeError(f"fit_config must be a FitConfig, got {type(cfg).__name__}")
    if not isinstance(mpq_config, MPQConfig):
        raise TypeError(f"mpq_config must be an mpq_plugin.MPQConfig, got {type(mpq_config).__name__}")
    if (cfg.checkpoint_every or resume or stop_at_step is not None) and cfg.run_dir is None:
        raise ValueError("checkpoints need a directory: set FitConfig(run_dir=...)")
    checkpoint = None
    if resume:
        path = Path(cfg.run_dir) / CHECKPOINT_NAME  # type: ignore[arg-type]
        if path.is_file():
            checkpoint = load_checkpoint(cfg.run_dir)  # type: ignore[arg-type]
        else:
            log.warning("resume requested but %s does not exist: starting a new run", path)
    if checkpoint is None:
        _seed_all(cfg.seed)

    stream = _DataStream(train_loader, cfg.seed, cfg.group_by_length)
    if val_loader is not None and hasattr(val_loader, "__len__") and len(val_loader) == 0:
        raise ValueError("val_loader yields no batches; give it data (or pass val_loader=None)")
    quantized = _is_quantized(model)
    teacher_owned = False
    if cfg.kd and teacher is None:
        if quantized:
            raise ValueError("kd=True needs a float teacher: pass teacher=<float model>, give fit the float "
                             "model (it quantizes it itself), or set FitConfig(kd=False)")
        teacher, teacher_owned = copy.deepcopy(model), True
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if not cfg.kd:
            teacher = None

    first_inputs, first_y = _split_batch(stream.batch_at(0))
    device = _model_device(model)
    first_inputs, first_y = _to(first_inputs, device), _to(first_y, device)
    if not quantized:
        from mpq_plugin.api import quantize_

        _check_batch(model, teacher, first_inputs, first_y, loss_fn)  # clear errors before quantize_
        was_training = model.training
        model.eval()  # calibrate without touching BatchNorm running statistics
        quantize_(model, mpq_config, example_inputs=first_inputs)
        model.train(was_training)
    elif getattr(model, "_mpq_config", None) is not None and model._mpq_config != mpq_config:  # type: ignore[operator]
        raise ValueError("the model was quantized with another MPQConfig than the one given to fit")
    else:
        _check_batch(model, teacher, first_inputs, first_y, loss_fn)

    tr = _Trainer(model, stream, mpq_config, cfg, teacher, loss_fn, teacher_owned)
    tr.make_search()
    if checkpoint is not None:
        tr.restore(checkpoint)
        if checkpoint.get("result") is not None and tr.step >= tr.total:
            log.info("run in %s is already complete: returning its saved result", cfg.run_dir)
            return _result_from(tr, checkpoint["result"])
    if tr.total == 0:
        raise ValueError("search and finetune both have 0 steps; set search_steps/finetune_steps")

    show = _show_bar(cfg.progress_bar)
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=tr.total, initial=tr.step, desc=f"{tr.method} {tr.phase_of(tr.step)}",
                   dynamic_ncols=True, leave=False)
    stop = tr.total if stop_at_step is None else min(int(stop_at_step), tr.total)
    try:
        with _DeferSigint() as sigint:
            while tr.step < stop:
                phase = tr.phase_of(tr.step)
                if tr.opt_phase != phase:
                    tr.enter_phase(phase)
                    if bar is not None:
                        bar.set_description(f"{tr.method} {phase}")
                t0 = time.perf_counter()
                value = tr.train_step(phase)
                tr.seconds[phase] += time.perf_counter() - t0
                if bar is not None:
                    bar.update(1)
                    bits = tr.bits_now()
                    bar.set_postfix(loss=f"{value:.4f}", **({"bits": f"{bits:.2f}"} if bits is not None else {}))
                if tr.step % cfg.log_every == 0 or tr.step == tr.total:
                    bits = tr.bits_now()
                    log.info("step %d/%d %s loss %.4f%s lr %.3g", tr.step, tr.total, phase, value,
                             f" avg bits {bits:.3f}" if bits is not None else "",
                             tr.optimizer.param_groups[0]["lr"])  # type: ignore[union-attr]
                if sigint.requested:
                    raise KeyboardInterrupt
                if cfg.checkpoint_every and tr.step % cfg.checkpoint_every == 0 and tr.step < tr.total:
                    tr.save()
    except KeyboardInterrupt:
        if tr.in_step:  # a second Ctrl-C (or an interrupt from elsewhere) stopped a step midway
            log.warning("interrupted in the middle of step %d: nothing saved; the last checkpoint (if any) "
                        "is kept, resume with --resume (fit(..., resume=True))", tr.step + 1)
            raise
        path = tr.save()
        if path is not None:
            log.warning("interrupted at step %d/%d: checkpoint saved to %s; resume with --resume "
                        "(fit(..., resume=True))", tr.step, tr.total, path)
        else:
            log.warning("interrupted at step %d/%d; no run_dir, nothing saved", tr.step, tr.total)
        raise
    finally:
        if bar is not None:
            bar.close()

    if tr.step < tr.total:
        tr.save()
        log.info("stopped at step %d/%d (stop_at_step); resume with resume=True", tr.step, tr.total)
        return _result_from(tr, None)
    if not tr.frozen:  # finetune_steps == 0: freeze at the end of the search
        tr.freeze_now()
    metrics = _final_metrics(model, val_loader, loss_fn)
    result = {"metrics": metrics}
    tr.save(result)
    res = _result_from(tr, result)
    log.info("%s done: accuracy %s, avg weight bits %.3f, search %.1fs, finetune %.1fs", tr.method,
             "n/a" if metrics.get("accuracy") is None else f"{metrics['accuracy']:.4f}",
             metrics["avg_weight_bits"], res.search_seconds, res.finetune_seconds)
    return res


def train_float(model: nn.Module, train_loader: DataLoader, steps: int, *, lr: float = 1e-2,
                weight_decay: float = 0.0, seed: int = 0, loss_fn: LossFn = F.cross_entropy,
                progress_bar: Optional[bool] = None, group_by_length: bool = False) -> float:
    """Train a float model (Adam, cosine learning rate, seeded data order); returns wall seconds.

    The float starting point of the demo and of configs without a float checkpoint.
    ``group_by_length`` as in :class:`FitConfig`.

    Raises:
        ValueError: empty loader or outputs that do not fit the loss.
        TrainingDiverged: NaN/Inf loss.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be a positive integer")
    _seed_all(seed)
    stream = _DataStream(train_loader, seed, group_by_length)
    device = _model_device(model)
    inputs, y = _split_batch(stream.batch_at(0))
    _check_batch(model, None, _to(inputs, device), _to(y, device), loss_fn)
    opt = make_adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    bar = None
    if _show_bar(progress_bar):
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="float", dynamic_ncols=True, leave=False)
    t0 = time.perf_counter()
    last: Optional[float] = None
    try:
        for step in range(steps):
            inputs, y = _split_batch(stream.batch_at(step))
            loss = loss_fn(model(*_to(inputs, device)), _to(y, device))
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"float training diverged at step {step + 1}/{steps}: the loss is {value}; "
                    + (f"last finite loss {last:.6g}" if last is not None else "no finite loss before it")
                    + f". Try a lower lr (now {lr:g})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            last = value
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
    finally:
        if bar is not None:
            bar.close()
    return time.perf_counter() - t0


def _final_metrics(model: nn.Module, val_loader: Optional[Any], loss_fn: LossFn) -> Dict[str, Any]:
    cost = model_cost(model)
    metrics: Dict[str, Any] = {k: v for k, v in cost.items() if isinstance(v, (int, float))}
    metrics["layers"] = cost["layers"]
    if val_loader is not None:
        ev = evaluate(model, val_loader, loss_fn)
        metrics["accuracy"], metrics["val_loss"] = ev["accuracy"], ev["loss"]
    return metrics


def _result_from(tr: _Trainer, result: Optional[Mapping[str, Any]]) -> FitResult:
    history = list(getattr(tr.search, "history", []) or []) if tr.search is not None else []
    return FitResult(
        plan=tr.plan, metrics=dict(result["metrics"]) if result else {}, history=history,
        losses=list(tr.losses), search_seconds=tr.seconds["search"], finetune_seconds=tr.seconds["finetune"],
        completed=result is not None, steps=tr.step, total_steps=tr.total,
        run_dir=str(tr.run_dir) if tr.run_dir is not None else None,
    )
