"""ProGrad's public functions, each defined in the module named after it (``prograd_losses``,
``project_conflicting``, ``prograd_backward``); imported together from here."""
from fastprompt.ops.prograd_backward import prograd_backward
from fastprompt.ops.prograd_losses import prograd_losses
from fastprompt.ops.project_conflicting import project_conflicting_

__all__ = ["prograd_backward", "prograd_losses", "project_conflicting_"]
