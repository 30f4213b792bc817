"""ditarkit.bench: speed and memory of every backend, side by side (ditar-bench)."""
