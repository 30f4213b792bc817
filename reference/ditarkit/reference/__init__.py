"""ditarkit.reference: the PyTorch reference DiTAR model, its losses and checkpoints."""
