"""fastprompt: fast, robust prompt tuning of CLIP-like models, shipped as ONNX."""
__version__ = "0.1.0"

from fastprompt.ops.clip_cross_entropy import clip_cross_entropy  # noqa: E402
from fastprompt.ops.prograd import prograd_backward, prograd_losses, project_conflicting_  # noqa: E402

__all__ = ["clip_cross_entropy", "prograd_losses", "project_conflicting_", "prograd_backward",
           "__version__"]
