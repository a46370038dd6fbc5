"""``mpq_plugin.pt2e``: torchao PT2E quantization configs, :class:`MPQQuantizer` and
:func:`convert_mpq_pt2e` (see :mod:`mpq_plugin.integrations.pt2e`). Importing it imports torchao."""
from mpq_plugin.integrations.pt2e import (  # noqa: F401
    MPQQuantizer,
    convert_mpq_pt2e,
    get_mpq_quantization_config,
    init_mpq_pt2e,
)

from mpq_plugin.integrations.tracing import export_for_mpq_qat  # noqa: F401,E402
from mpq_plugin.integrations.observer import MPQObserver  # noqa: F401,E402

__all__ = ["MPQObserver", "MPQQuantizer", "export_for_mpq_qat", "convert_mpq_pt2e", "get_mpq_quantization_config", "init_mpq_pt2e"]
