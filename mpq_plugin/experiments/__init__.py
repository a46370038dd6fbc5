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

#: seeds a full run uses per task when ``--seeds`` is not given. ``make results`` runs every
#: (task, seed) as its own process, two at a time (:mod:`mpq_plugin.experiments.parallel`), which
#: keeps the four tasks x three seeds within an hour on 2 cores.
DEFAULT_SEEDS = {"mnist5k-cnn": 3, "mtcnn-faces": 3, "minilm-sentiment": 3, "minilm-fidelity": 3}

__all__ = ["DEFAULT_SEEDS", "METHODS", "ResultRow", "TASKS"]
