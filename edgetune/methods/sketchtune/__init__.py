"""`sketchtune`: each frozen projection becomes low-bit codes + small per-row-group tables; only the tables train.

SketchTune (arXiv 2410.06364) with sketches built the LeanQuant way (arXiv 2407.10032); see
``edgetune.quant.sketch`` for the construction and ``layer.py`` for the trainable matmul.
"""
from .. import Method, register_method
from .config import SketchTuneConfig
from .layer import SketchLinear
from .model import apply

METHOD = register_method(Method(
    "sketchtune", SketchTuneConfig, apply,
    "weights compressed to 2-4 bit codes + per-row-group lookup tables (LeanQuant construction); only the tables train",
))

__all__ = ["SketchTuneConfig", "SketchLinear", "METHOD"]
