"""Adapters to host frameworks (torch.ao, torchao, ...). Each submodule imports its host
library itself, so ``import mpq_plugin`` never pulls them in."""
