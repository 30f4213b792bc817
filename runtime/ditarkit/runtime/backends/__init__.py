"""Backends behind the runtime's GraphRunner: ONNX Runtime and TensorRT."""
