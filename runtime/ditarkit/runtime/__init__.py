"""ditarkit.runtime: the torch-free DiTAR runtime (numpy + ONNX Runtime or TensorRT)."""

__version__ = "0.1.0"
