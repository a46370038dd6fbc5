"""Bit-width search: budget penalties, schedules, the MPQSearch loop object, finetune losses.

    from mpq_plugin.search import MPQSearch
    search = MPQSearch(model, total_steps=steps)      # budget from quantize_'s config
    loss = task_loss + search.penalty(); ...; search.step()
    plan = search.freeze()                            # BitPlan within budget, or BudgetError
"""
from mpq_plugin.search.budgets import (
    BUDGET_KEYS,
    DEFAULT_LAMBDA,
    FORMULATIONS,
    BudgetController,
    BudgetError,
    BudgetPenalty,
    check_budget,
    check_feasible,
    hinge,
    hinge_sq,
    lam_from_absolute,
    minimum_achievable,
    signed,
)
from mpq_plugin.search.losses import (
    ENTROPY_WEIGHTS,
    bin_regularization,
    code_entropy,
    entropy_aware_bin_regularization,
    kd_loss,
)
from mpq_plugin.search.schedules import (
    Schedule,
    constant,
    cosine,
    exponential,
    linear_ramp,
    progress_of,
    schedule_from_dict,
    step_decay,
    step_ramp,
    warmup,
)
from mpq_plugin.search.searcher import MPQSearch
from mpq_plugin.search.trainer import FitConfig, FitResult, TrainingDiverged, fit, optimizer_param_groups

__all__ = [
    "BUDGET_KEYS",
    "DEFAULT_LAMBDA",
    "ENTROPY_WEIGHTS",
    "FORMULATIONS",
    "BudgetController",
    "BudgetError",
    "BudgetPenalty",
    "FitConfig",
    "FitResult",
    "MPQSearch",
    "TrainingDiverged",
    "Schedule",
    "bin_regularization",
    "check_budget",
    "check_feasible",
    "code_entropy",
    "constant",
    "cosine",
    "entropy_aware_bin_regularization",
    "exponential",
    "fit",
    "hinge",
    "hinge_sq",
    "kd_loss",
    "lam_from_absolute",
    "linear_ramp",
    "minimum_achievable",
    "optimizer_param_groups",
    "progress_of",
    "schedule_from_dict",
    "signed",
    "step_decay",
    "step_ramp",
    "warmup",
]
