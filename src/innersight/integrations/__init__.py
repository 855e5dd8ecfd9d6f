"""Bridges to other evaluation tools; each submodule imports its tool only when it is used.

* :mod:`innersight.integrations.lmms_eval`: innersight as an lmms-eval model
  (``lmms-eval --model innersight --model_args pretrained=...,methods=deco --tasks pope``);
  needs lmms-eval (see that module for the CPU-safe install).
* :mod:`innersight.integrations.lmms_samples`: per-sample records of an ``innersight eval`` run
  in the shape lmms-eval writes with ``--log_samples``; needs nothing extra.

lmms-eval 0.7.3 finds external models through the Python entry-point group
``lmms_eval.models``: the installed package declares ``innersight =
"innersight.integrations:lmms_eval_manifest"`` (``pyproject.toml``), and lmms-eval calls
:func:`lmms_eval_manifest` while it builds its model registry.
"""

from __future__ import annotations

from typing import Any

#: the name lmms-eval knows the model by (``--model innersight``)
LMMS_EVAL_MODEL_ID = "innersight"
#: the import path of the lmms-eval model class (simple model type: context + doc_to_visual)
LMMS_EVAL_CLASS_PATH = "innersight.integrations.lmms_eval.InnersightLMMS"
#: the import path of the chat model type (doc_to_messages), which lmms-eval prefers when present
LMMS_EVAL_CHAT_CLASS_PATH = "innersight.integrations.lmms_eval.InnersightLMMSChat"


def lmms_eval_manifest() -> Any:
    """The ``ModelManifest`` lmms-eval registers for ``--model innersight`` (entry point of the
    ``lmms_eval.models`` group). The model class itself is imported only when lmms-eval resolves
    the name, so listing lmms-eval's models loads neither innersight's models nor torch. Both
    model types are registered: lmms-eval resolves the chat one unless ``--force_simple``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=LMMS_EVAL_MODEL_ID, simple_class_path=LMMS_EVAL_CLASS_PATH,
                         chat_class_path=LMMS_EVAL_CHAT_CLASS_PATH)
