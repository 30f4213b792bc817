"""ditarkit.calibration: INT8 quantization of exported graphs from recorded activations."""
