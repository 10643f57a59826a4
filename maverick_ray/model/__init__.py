"""Pure-torch Llama 4 math. Imports no ray and no torch.distributed."""
