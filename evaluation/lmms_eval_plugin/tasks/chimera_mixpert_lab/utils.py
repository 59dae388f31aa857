"""Functions of the mini-lab's lmms-eval task `chimera_mixpert_lab`. lmms-eval loads this file by path
(`!function utils.<name>` in the YAML file next to it)."""

from train.evaluate import score_rows
from train.quickstart import LAB_METRICS


def doc_to_visual(doc) -> list:
    return [doc["image"]]


def process_results(doc, results) -> dict:
    """The row's score with its domain's metric, exactly as `train.evaluate` scores the lab (`score_rows`, the lab's
    metric choices `LAB_METRICS`): `lab_score` over all rows and `lab_<domain>` per domain."""
    domain = doc["domain"]
    value = score_rows([doc], [results[0]], LAB_METRICS)[domain]["score"]
    return {"lab_score": value, f"lab_{domain}": value}

