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

__all__ = ["METHODS", "ResultRow", "TASKS"]
