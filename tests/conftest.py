import torch

# Two cores on the CI machine; keep torch from oversubscribing them.
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
