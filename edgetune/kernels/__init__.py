"""Op registry: one torch.library schema per update-path op, with reference/cpu/cuda/triton backends."""
