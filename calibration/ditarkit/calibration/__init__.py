"""ditarkit.calibration: INT8/FP8 quantization of exported graphs from recorded activations."""
