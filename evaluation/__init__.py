"""Evaluation metrics for Chimera / Mixpert: per-benchmark answer scoring and router quality (see `metrics`)."""

from .metrics import (
    DEFAULT_DOMAIN_METRICS,
    METRICS,
    anls,
    confusion_matrix,
    exact_match,
    extract_answer_mathvista,
    levenshtein,
    mathvista_score,
    normalize_answer,
    normalize_extracted_answer_mathvista,
    ocrbench_match,
    relaxed_accuracy,
    router_accuracy,
    score,
    teds,
)


__all__ = [
    "DEFAULT_DOMAIN_METRICS",
    "METRICS",
    "anls",
    "confusion_matrix",
    "exact_match",
    "extract_answer_mathvista",
    "levenshtein",
    "mathvista_score",
    "normalize_answer",
    "normalize_extracted_answer_mathvista",
    "ocrbench_match",
    "relaxed_accuracy",
    "router_accuracy",
    "score",
    "teds",
]
