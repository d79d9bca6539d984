"""Compression: structured (torch-pruning), dynamic (LDMamba's screening) and depth pruning, distillation."""
