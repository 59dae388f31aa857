"""lmms-eval models `chimera` and `mixpert`: Chimera and Mixpert on lmms-eval's benchmarks (ChartQA, DocVQA, MathVista,
...) with `python -m lmms_eval --model chimera|mixpert --model_args pretrained=<folder or repo id>`.

lmms-eval (`pip install -e ".[lmms]"`) finds both models through the `lmms_eval.models` entry point declared in
`setup.py`, which points at `registry.manifests`: lmms-eval's documented plugin mechanism (`ModelRegistryV2.
load_entrypoint_manifests`; the older `LMMS_EVAL_PLUGINS` variable is deprecated there). The classes are in
`evaluation.lmms_eval_plugin.models`; `tasks/` holds a local task over the mini-lab's synthetic data.
"""
