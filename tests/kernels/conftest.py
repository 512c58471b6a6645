import os

import torch

# Triton kernels run on CPU tensors through the interpreter; the flag must be set before
# triton.jit decorates them (the kernel module is imported lazily, on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
