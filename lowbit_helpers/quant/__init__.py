"""Quantization algorithms: one module each, ONNX in -> ONNX out, the recipe saved beside it."""
