"""weightgen: template banks (RECAST), Neural Mimicry and weight generation for any PyTorch model."""
__version__ = "0.1.0"

from .config import PRESETS, RecastConfig, preset_config  # noqa: E402
from .recasting import (  # noqa: E402
    export_dense, mark_only_coefficients_trainable, merge_and_unload, parameter_counts,
)
from .api import recast  # noqa: E402
from .mimicry import fit  # noqa: E402
from .artifact import load, save  # noqa: E402
from .tasks import load_task, save_task  # noqa: E402

__all__ = [
    "__version__", "RecastConfig", "PRESETS", "preset_config", "recast", "fit", "export_dense",
    "merge_and_unload", "mark_only_coefficients_trainable", "parameter_counts", "save", "load",
    "save_task", "load_task",
]
