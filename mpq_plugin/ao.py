"""``mpq_plugin.ao``: the torch.ao (eager/FX) and PT2E fake-quant integration; see
:mod:`mpq_plugin.integrations.torch_ao`. Importing it imports torch.ao (and torchao if installed)."""
from mpq_plugin.integrations import torch_ao as _impl
from mpq_plugin.integrations.torch_ao import *  # noqa: F401,F403
from mpq_plugin.integrations.torch_ao import (  # noqa: F401
    MPQFakeQuantize,
    fake_quantize_class,
    get_mpq_qat_qconfig,
    get_mpq_qat_qconfig_mapping,
    init_mpq_fake_quants,
    mpq_fake_quants,
    weight_seen_by_fake_quant,
)

from mpq_plugin.integrations.ao_convert import (  # noqa: F401,E402
    FrozenActivation,
    FrozenWeight,
    apply_torchao_weights,
    convert_mpq,
    kernel_table_markdown,
    torchao_inference_configs,
)

from mpq_plugin.integrations.tracing import prepare_mpq_qat_fx  # noqa: F401,E402
from mpq_plugin.integrations.observer import MPQObserver  # noqa: F401,E402

__all__ = list(_impl.__all__) + ["MPQObserver", "prepare_mpq_qat_fx", "FrozenActivation", "FrozenWeight", "apply_torchao_weights", "convert_mpq", "kernel_table_markdown",
                                 "torchao_inference_configs"]


def __getattr__(name: str):  # fake-quant classes of methods registered later
    return getattr(_impl, name)
