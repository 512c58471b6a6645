"""Optional dependencies of the ORT backend: imported only when an ORT command runs."""
from __future__ import annotations

from ..errors import MissingDependency

INSTALL_HINT = "pip install 'edgetune[ort]'"


def require_ort():
    """``(onnx, onnxruntime)`` with the training API, or a one-line :class:`MissingDependency`."""
    try:
        import onnx
        import onnxruntime
        import onnxruntime.training.api  # noqa: F401  (only the training build has it)
    except ImportError as exc:
        name = getattr(exc, "name", None) or "onnxruntime-training"
        raise MissingDependency(f"the ORT backend needs onnx and onnxruntime-training ({name} is missing): "
                                f"{INSTALL_HINT}") from None
    return onnx, onnxruntime
