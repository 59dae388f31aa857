"""The entry point lmms-eval reads (`setup.py`: `lmms_eval.models` group): the models this package adds.

Kept apart from the package's `__init__`, which imports nothing from lmms-eval: lmms-eval reads entry points while
`lmms_eval.models` is being imported, and this module needs only `registry_v2`, which is imported by then, so the
models register whichever of lmms-eval or this package is imported first.
"""

from lmms_eval.models.registry_v2 import ModelManifest


def manifests() -> list:
    """The two models lmms-eval registers from this package (their module is imported only when a run asks for one)."""
    return [
        ModelManifest(model_id="chimera", simple_class_path="evaluation.lmms_eval_plugin.models.Chimera"),
        ModelManifest(model_id="mixpert", simple_class_path="evaluation.lmms_eval_plugin.models.Mixpert"),
    ]
