"""ditarkit.export: PyTorch checkpoint -> ONNX graphs, manifest and TensorRT engines."""
