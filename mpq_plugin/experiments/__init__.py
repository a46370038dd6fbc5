"""Reproducible comparisons behind ``mpq results``: one module per task, one row schema.

Each task module exposes ``run(budgets, seeds, quick, methods) -> List[ResultRow]`` and is listed
in :data:`TASKS` (name -> ``"module:function"``), imported only when run, so ``import mpq_plugin``
stays torch-only.
"""
from mpq_plugin.experiments.common import METHODS, ResultRow

TASKS = {
    "mnist5k-cnn": "mpq_plugin.experiments.vision:run_mnist",
    "mtcnn-faces": "mpq_plugin.experiments.vision:run_faces",
    "minilm-sentiment": "mpq_plugin.experiments.text:run_sentiment",
    "minilm-fidelity": "mpq_plugin.experiments.text:run_fidelity",
}

#: seeds a full run uses per task when ``--seeds`` is not given. The MiniLM tasks train a 22.7M
#: parameter encoder: one seed of budgets 2/3/4 costs them about as much as the three seeds of
#: both vision tasks together, so they run one seed by default to keep ``make results`` within
#: an hour on 2 cores (``mpq results --seeds 3 --resume`` adds the other seeds).
DEFAULT_SEEDS = {"mnist5k-cnn": 3, "mtcnn-faces": 3, "minilm-sentiment": 1, "minilm-fidelity": 1}

__all__ = ["DEFAULT_SEEDS", "METHODS", "ResultRow", "TASKS"]
