"""Sensitivity-guided low-bit quantization of YOLOv10 ONNX detectors: the helpers behind the notebooks."""

__version__ = "0.1.0"
