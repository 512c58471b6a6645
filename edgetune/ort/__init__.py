"""ONNX Runtime Training: export the compiled training graph and train on it."""
