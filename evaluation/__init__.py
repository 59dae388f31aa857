"""Evaluation metrics for Chimera / Mixpert: per-benchmark answer scoring and router quality (see `metrics`)."""

from . import metrics
from .metrics import *  # noqa: F401,F403  (the public names are `metrics.__all__`)


__all__ = list(metrics.__all__)
