"""Small helpers every layer may use: name registries, the module-swap walk, torch.distributed, progress
reporting, and memory (the calibration budget, counting tensor bytes)."""
