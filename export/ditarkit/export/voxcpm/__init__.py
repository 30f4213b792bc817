"""VoxCPM (OpenBMB's DiTAR-family models): strict checkpoint loading into the `voxcpm` package's modules.

See README.md here for how the package's modules map onto DiTAR's pieces.
"""

from ditarkit.export.voxcpm.checkpoint import (
    ARCHITECTURES,
    VoxCPMCheckpointError,
    detect_architecture,
    fold_weight_norm,
    load_voxcpm,
)

__all__ = ["ARCHITECTURES", "VoxCPMCheckpointError", "detect_architecture", "fold_weight_norm", "load_voxcpm"]
