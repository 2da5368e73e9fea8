"""The package root imports nothing heavy (PEP 562 lazy names), and its names still work."""
from __future__ import annotations

import subprocess
import sys

import pytest

import fastprompt


def test_import_fastprompt_loads_no_torch():
    code = ("import sys, fastprompt; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'onnx', 'onnxruntime', 'open_clip', 'numpy', 'fastprompt._C') "
            "or m.startswith('fastprompt.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_lazy_names_resolve_to_the_ops():
    from fastprompt.ops.clip_cross_entropy import clip_cross_entropy
    from fastprompt.ops.prograd_backward import prograd_backward
    from fastprompt.ops.prograd_losses import prograd_losses
    from fastprompt.ops.project_conflicting import project_conflicting_
    from fastprompt._validation import set_validation
    assert fastprompt.clip_cross_entropy is clip_cross_entropy
    assert fastprompt.prograd_losses is prograd_losses
    assert fastprompt.prograd_backward is prograd_backward
    assert fastprompt.project_conflicting_ is project_conflicting_
    assert fastprompt.set_validation is set_validation
    assert {"clip_cross_entropy", "prograd_losses", "set_validation"} <= set(dir(fastprompt))
    assert set(fastprompt.__all__) >= {"clip_cross_entropy", "prograd_backward", "__version__"}


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'no_such_op'"):
        fastprompt.no_such_op  # noqa: B018
