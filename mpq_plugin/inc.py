"""Intel Neural Compressor 3.x integration (alias of :mod:`mpq_plugin.integrations.inc`).

    from mpq_plugin.inc import MPQConfig, train_with        # MPQConfig is INC's config "mpq"
    q_model = quantize(model, MPQConfig(method="sdq", budget=3.0), run_fn=train_with(train_loader))

Importing it imports neural_compressor (``pip install mpq_plugin[inc]``); ``import mpq_plugin``
does not.
"""
from mpq_plugin.integrations.inc import *  # noqa: F401,F403
from mpq_plugin.integrations.inc import __all__  # noqa: F401
