"""Entry points (`python -m train.chimera`, `train.mixpert`, `train.dpo`, ...) and their YAML configs (`configs/`); the
library they share is the `chimera_mixpert` package."""
