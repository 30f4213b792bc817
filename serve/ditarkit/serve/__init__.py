"""ditarkit.serve: a bundle behind Triton Inference Server, streaming (ditar-serve, ditar-loadtest)."""
