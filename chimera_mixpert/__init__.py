"""chimera_mixpert: the library behind the `train/` entry points (`python -m train.chimera`, `train.mixpert`, ...):
training arguments and Trainer glue (`training`), data loading, collators, export and synthetic data (`data`), tiny
offline and real-shape model builders (`tiny`, `real_shapes`) and model card rendering (`model_card`). The
Chimera / Mixpert model classes themselves are the top-level Hub modules (`modeling_chimera`, `modeling_mixpert`, ...).
Importing the package imports none of its submodules: import the one you need (`from chimera_mixpert.tiny import ...`).
"""
