"""Answer-level metrics for the Chimera / Mixpert evaluation: one pure function per benchmark family.

Every metric scores ONE sample and returns a float in `[0, 1]`; a dataset score is the mean over samples (as in each
reference implementation). Multi-answer targets (a list of ground truths) take the best score over the ground
truths, as `google-research/pix2struct` `pix2struct/metrics.py` `aggregate_metrics` does.

| name                | function                          | benchmark family           |
|---------------------|-----------------------------------|----------------------------|
| `relaxed_accuracy`  | [`relaxed_accuracy`]              | ChartQA, PlotQA            |
| `anls`              | [`anls`]                          | DocVQA, InfographicVQA     |
| `exact_match`       | [`exact_match`]                   | general VQA                |
| `ocrbench`          | [`ocrbench_match`]                | OCRBench                   |
| `mathvista`         | [`mathvista_score`]               | MathVista                  |
| `teds`              | [`teds`]                          | table recognition (HTML)   |
| `teds_structure`    | [`teds`] with `structure_only`    | table structure only       |

[`score`] dispatches by name (see `METRICS`), and `DEFAULT_DOMAIN_METRICS` names the metric of each expert domain.
Routing quality is measured with [`router_accuracy`] and [`confusion_matrix`].

`teds` needs the `apted` and `lxml` packages (imported when it is first called); everything else is standard library.
"""

import functools
import json
import re
from types import MappingProxyType
from typing import Any, Callable, List, Mapping, Optional, Sequence, Union


__all__ = [
    "DEFAULT_DOMAIN_METRICS",
    "DOMAINS",
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
    "score_row",
    "teds",
]

Targets = Union[str, Sequence[str]]


# ---------------------------------------------------------------------------------------------------------- helpers


def _as_targets(targets: Any) -> List[str]:
    """A single ground truth or a sequence of them (list, tuple, numpy array), as a non-empty list of strings."""
    if hasattr(targets, "tolist") and not isinstance(targets, str):
        targets = targets.tolist()
    if isinstance(targets, str) or not isinstance(targets, Sequence):
        targets = [targets]
    if len(targets) == 0:
        raise ValueError("At least one ground-truth answer is needed, got an empty sequence.")
    return [str(t) for t in targets]


def levenshtein(a: Sequence, b: Sequence) -> int:
    """Levenshtein (edit) distance between two sequences: insertions, deletions and substitutions all cost 1.

    Works on strings (characters) and on lists of tokens (TEDS cell contents). Two-row dynamic programme,
    `O(len(a) * len(b))` time, `O(min(len(a), len(b)))` memory.

    Args:
        a (`Sequence`): first sequence.
        b (`Sequence`): second sequence.

    Returns:
        `int`: the edit distance.
    """
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, item_a in enumerate(a, start=1):
        current = [i]
        for j, item_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (item_a != item_b)))
        previous = current
    return previous[-1]


def _normalized_levenshtein(a: Sequence, b: Sequence) -> float:
    """`levenshtein(a, b) / max(len(a), len(b))`, 0.0 for two empty sequences."""
    longest = max(len(a), len(b))
    return 0.0 if longest == 0 else levenshtein(a, b) / longest


# ---------------------------------------------------------------------------------------------- relaxed accuracy

_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?%?$")


def _chartqa_to_float(text: str) -> Optional[float]:
    """`float(text)`, `"12%"` -> 0.12, `"1,000"` -> 1000.0; `None` when `text` is not a number."""
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def _relaxed_correctness(prediction: str, target: str, tolerance: float) -> bool:
    prediction_float = _chartqa_to_float(prediction)
    target_float = _chartqa_to_float(target)
    if prediction_float is not None and target_float:  # a target of 0 falls through to the string comparison
        return abs(prediction_float - target_float) / abs(target_float) <= tolerance
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, target: Targets, tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy: a numeric answer within `tolerance` relative error of the target is correct, any
    other answer needs a case-insensitive exact match.

    Matches `relaxed_correctness` of `google-research/pix2struct` `pix2struct/metrics.py` (identical copies in
    `EvolvingLMMs-Lab/lmms-eval` `lmms_eval/tasks/chartqa/utils.py` and `QwenLM/Qwen-VL` `eval_mm/evaluate_vqa.py`):

    - the bound is inclusive: `|prediction - target| / |target| <= tolerance` (exactly 5% off is correct);
    - a trailing `%` divides by 100 (`"12%"` is 0.12), so `"12%"` matches `"0.12"` but NOT `"12"`;
    - a target of 0 (or a non-numeric side) is compared as strings, lowercased: `"0"` matches `"0"` only, not
      `"0.0"` (a relative tolerance around 0 would be empty).

    Deviations from the reference: both strings are `str()`-converted and whitespace-stripped first, and numbers
    with comma thousands separators (`"1,000"`, `"12,345.6"`, only in well-formed 3-digit groups) are read as
    numbers (the reference's `float("1,000")` fails, so it compared the strings and `"1,000"` != `"1000"`).
    A list of targets scores the best match.

    Args:
        prediction (`str`): the model's answer.
        target (`str` or `Sequence[str]`): the ground truth(s).
        tolerance (`float`, *optional*, defaults to 0.05): maximum relative error of a numeric answer.

    Returns:
        `float`: 1.0 if correct, else 0.0.
    """
    prediction = str(prediction).strip()
    return float(any(_relaxed_correctness(prediction, t.strip(), tolerance) for t in _as_targets(target)))


# ---------------------------------------------------------------------------------------------------------- ANLS


def _anls_normalize(text: str) -> str:
    return " ".join(str(text).strip().lower().split())


def anls(prediction: str, targets: Targets, threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one answer (DocVQA, InfographicVQA, ST-VQA).

    Both sides are lowercased, stripped and have inner whitespace collapsed; `NL = levenshtein / max(len)` over
    the normalized strings; the score is `1 - min(NL)` over the ground truths, set to 0 when it is below
    `threshold`. This follows the official RRC script (rrc.cvc.uab.es, DocVQA / InfographicVQA evaluation) as
    copied in `EvolvingLMMs-Lab/lmms-eval` `lmms_eval/api/metrics.py` `anls` (from `QwenLM/Qwen-VL`
    `eval_mm/infographicsvqa_eval.py`): `if question_result < threshold: question_result = 0`. So a similarity of
    exactly `threshold` is KEPT: NL == 0.5 scores 0.5 (`google-research/pix2struct` `anls_metric` agrees:
    `normalized_ld <= theta`). The ST-VQA paper's Eq. 1 writes `NL < tau` instead; the reference code is followed.

    Deviation: the reference divides by the lengths of the raw (un-normalized) strings; here the normalized
    lengths are used, so NL is always the edit distance of the compared strings over their own length (differs only
    for answers with surrounding or repeated whitespace).

    Args:
        prediction (`str`): the model's answer; an empty answer scores 0 unless a ground truth is empty too.
        targets (`str` or `Sequence[str]`): the ground truth(s); the best one counts.
        threshold (`float`, *optional*, defaults to 0.5): similarities below it score 0.

    Returns:
        `float`: the ANLS of this answer, in `[0, 1]`.
    """
    prediction = _anls_normalize(prediction)
    similarity = 1.0 - min(_normalized_levenshtein(prediction, _anls_normalize(t)) for t in _as_targets(targets))
    return similarity if similarity >= threshold else 0.0


# --------------------------------------------------------------------------------------------------- exact match


def normalize_answer(text: str) -> str:
    """The `exact_match` normalization: lowercase, strip, collapse inner whitespace to one space, drop one trailing
    period (`"  The  Cat. "` -> `"the cat"`).

    Args:
        text (`str`): any answer (non-strings are `str()`-converted).

    Returns:
        `str`: the normalized answer.
    """
    text = " ".join(str(text).lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def exact_match(prediction: str, target: Targets) -> float:
    """Exact match after [`normalize_answer`] (lowercase, strip, collapse whitespace, drop a trailing period).

    Reference: the `exact_match` metric of `huggingface/evaluate` `metrics/exact_match/exact_match.py` (used by
    `EvolvingLMMs-Lab/lmms-eval` `lmms_eval/api/metrics.py`) with `ignore_case=True` and
    `regexes_to_ignore=[r"\\.$"]`; deviation: whitespace is also stripped and collapsed. A list of targets scores
    1.0 when any matches.

    Args:
        prediction (`str`): the model's answer.
        target (`str` or `Sequence[str]`): the ground truth(s).

    Returns:
        `float`: 1.0 on a match, else 0.0.
    """
    prediction = normalize_answer(prediction)
    return float(any(prediction == normalize_answer(t) for t in _as_targets(target)))


# ------------------------------------------------------------------------------------------------------ OCRBench


def _ocrbench_normalize(text: str, math_expression: bool) -> str:
    if math_expression:
        return str(text).strip().replace("\n", " ").replace(" ", "")
    return str(text).lower().strip().replace("\n", " ")


def ocrbench_match(prediction: str, targets: Targets, dataset_name: Optional[str] = None) -> float:
    """OCRBench correctness: some normalized ground truth is a substring of the normalized prediction.

    Matches the scoring loop of `Yuliang-Liu/MultimodalOCR` `OCRBench/scripts/*.py` (e.g. `intervl.py`), which has
    two rules keyed on the sample's `dataset_name`:

    - `"HME100k"` (handwritten math expressions): case-SENSITIVE; strip, newlines -> spaces, then every space
      removed (`"x ^ { 2 }"` matches `"x^{2}"`);
    - every other subset: lowercase, strip, newlines -> spaces (inner spaces kept).

    As in the reference, an empty ground truth is a substring of anything.

    Args:
        prediction (`str`): the model's answer.
        targets (`str` or `Sequence[str]`): the ground truth(s).
        dataset_name (`str`, *optional*): the OCRBench `dataset_name` field; only `"HME100k"` changes the rule.

    Returns:
        `float`: 1.0 if some ground truth occurs in the prediction, else 0.0.
    """
    math_expression = dataset_name == "HME100k"
    prediction = _ocrbench_normalize(prediction, math_expression)
    return float(any(_ocrbench_normalize(t, math_expression) in prediction for t in _as_targets(targets)))


# ----------------------------------------------------------------------------------------------------- MathVista

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_ANSWER_CUE = re.compile(r"\b(?:answer|option|choice)\s*(?:is\b|:|=)\s*:?", re.IGNORECASE)
_QUOTED_ANSWER = re.compile(r'The answer is "(.*)"\.')  # the reference's `quick_extract` rule
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_LEADING_LETTER = re.compile(r"^\s*(?:\(([A-Za-z])\)|([A-Z])(?![A-Za-z0-9]))")
# At the start of a whole response a bare capital may be an article ("A square has..."): it needs punctuation or
# nothing after it ("B", "B.", "B) 8/11", "B: ...").
_LEADING_LETTER_STRICT = re.compile(r"^\s*(?:\(([A-Za-z])\)|([A-Z])(?:[.):,]|\s*$))")
_PARENTHESIZED_LETTER = re.compile(r"\(([A-Za-z])\)")
_BRACKETED_LIST = re.compile(r"\[[^\[\]]*\]")


def _candidate_segments(response: str) -> List[tuple]:
    """`(text, is_final)` pieces of a response, most explicit first: the last `\\boxed{...}`, the text after the
    last "answer is" / "answer:" cue, then the whole response. `is_final` marks the pieces that hold only the answer
    (take their first number, not the last)."""
    segments = []
    boxed = _BOXED.findall(response)
    if boxed:
        segments.append((boxed[-1], True))
    cues = list(_ANSWER_CUE.finditer(response))
    if cues:
        segments.append((response[cues[-1].end() :], True))
    segments.append((response, False))
    return segments


def _extract_choice(segment: str, choices: Sequence[str], is_final: bool) -> Optional[str]:
    """An option letter or an option's text found in `segment`, or `None`."""
    options = [chr(ord("A") + i) for i in range(len(choices))]
    match = (_LEADING_LETTER if is_final else _LEADING_LETTER_STRICT).match(segment)
    if match and (match.group(1) or match.group(2)).upper() in options:
        return (match.group(1) or match.group(2)).upper()
    letters = [letter.upper() for letter in _PARENTHESIZED_LETTER.findall(segment) if letter.upper() in options]
    if letters:
        return letters[-1]
    lowered = segment.lower()
    found = [str(c) for c in choices if str(c).strip() and str(c).strip().lower() in lowered]
    # Drop options contained in another found option ("3" inside "13"); only an unambiguous mention counts.
    found = [c for c in found if not any(c != other and c.lower() in other.lower() for other in found)]
    return found[0] if len(found) == 1 else None


def _extract_number(segment: str, is_final: bool) -> Optional[str]:
    numbers = _NUMBER.findall(segment)
    if not numbers:
        return None
    return (numbers[0] if is_final else numbers[-1]).replace(",", "")


def _extract_list(segment: str, is_final: bool) -> Optional[str]:
    lists = _BRACKETED_LIST.findall(segment)
    if lists:
        return lists[0] if is_final else lists[-1]
    numbers = [n.replace(",", "") for n in _NUMBER.findall(segment)]
    return "[" + ", ".join(numbers) + "]" if numbers else None


def extract_answer_mathvista(
    response: str,
    question_type: str,
    answer_type: str,
    choices: Optional[Sequence[str]] = None,
    precision: Optional[float] = None,
) -> str:
    """Rule-based MathVista answer extraction: the answer part of a free-text response, as a string.

    Reference: `lupantech/MathVista` `evaluation/extract_answer.py` `extract_answer`. Its cheap checks are kept as is
    (empty response -> `""`; a multiple-choice response equal to a choice; a response that parses as the integer /
    float; the `quick_extract` rule `The answer is "(.*)".`). DEVIATION: the official protocol then asks GPT-4 to
    extract the answer (few-shot prompt `evaluation/prompts/ext_ans.py`); here deterministic rules replace it, so
    scores are not the official MathVista numbers. The rules look, in order, at the last `\\boxed{...}`, the text
    after the last "answer is" / "answer:" / "option is" cue, then the whole response:

    - `multi_choice`: a leading option letter (`"B"`, `"(B)"`, `"B. 8/11"`), else the last parenthesized option
      letter (`"... (B) 8/11"`), else the one option whose text appears (case-insensitive, unambiguous);
      otherwise the stripped response is returned and [`normalize_extracted_answer_mathvista`] picks the most
      similar option, as the reference does for any extraction;
    - `integer` / `float`: the first number of a boxed / cued answer, else the LAST number of the response;
      thousands separators removed (`"1,234"` -> `"1234"`);
    - `list`: a bracketed list (`"[1, 2]"`), else the numbers found, formatted as `"[2007, 2008]"`;
    - anything else (free-form text): the boxed / cued answer, else the whole response, stripped of surrounding
      quotes and a trailing period.

    Args:
        response (`str`): the model's full response.
        question_type (`str`): `"multi_choice"` or `"free_form"`.
        answer_type (`str`): `"integer"`, `"float"`, `"list"` or `"text"`.
        choices (`Sequence[str]`, *optional*): the options of a multiple-choice question, in letter order.
        precision (`float`, *optional*): decimal places of a float answer (unused here, see
            [`normalize_extracted_answer_mathvista`]; accepted so one `problem` dict feeds both functions).

    Returns:
        `str`: the extracted answer (`""` for an empty response).
    """
    response = str(response)
    if response.strip() == "":
        return ""
    choices = [str(c) for c in (choices or [])]
    if question_type == "multi_choice" and response in choices:
        return response
    if answer_type == "integer":
        try:
            return str(int(response))
        except ValueError:
            pass
    if answer_type == "float":
        try:
            return str(float(response))
        except ValueError:
            pass
    quoted = _QUOTED_ANSWER.search(response)
    if quoted:
        return quoted.group(1)

    for segment, is_final in _candidate_segments(response):
        if question_type == "multi_choice":
            found = _extract_choice(segment, choices, is_final)
        elif answer_type in ("integer", "float"):
            found = _extract_number(segment, is_final)
        elif answer_type == "list":
            found = _extract_list(segment, is_final)
        else:
            found = segment.strip().strip("\"'").rstrip(".").strip() if is_final else None
        if found:
            return found
    return response.strip().strip("\"'").rstrip(".").strip()


def _most_similar(prediction: str, choices: Sequence[str]) -> str:
    """The choice closest to `prediction` in edit distance (first one on ties), as MathVista's `get_most_similar`."""
    distances = [levenshtein(prediction, choice) for choice in choices]
    return choices[distances.index(min(distances))]


def normalize_extracted_answer_mathvista(
    extraction: Any,
    choices: Optional[Sequence[str]],
    question_type: str,
    answer_type: str,
    precision: Optional[float] = None,
    ignore_empty_extractions: bool = False,
) -> Optional[str]:
    """Map an extracted answer onto the answer type, as `normalize_extracted_answer` of `lupantech/MathVista`
    `evaluation/calculate_score.py`.

    - `multi_choice`: the first `"(X)"` letter if any; an option letter becomes its option text, anything else the
      most similar option by (case-sensitive) Levenshtein distance, so an empty extraction picks the shortest option
      unless `ignore_empty_extractions` (then `None`);
    - `integer`: `str(int(float(x)))` (`"3.0"` -> `"3"`, `"3.7"` -> `"3"`); `float`: `str(round(float(x),
      int(precision)))` (`"1.456"`, precision 2 -> `"1.46"`; `"1.40"` -> `"1.4"`); `list`: `str(x)`; `None` when the
      conversion fails.

    Deviations: other answer types (free-form `"text"`, absent from MathVista) return the stripped extraction
    (the reference leaves the variable unset there); a float answer without `precision` raises instead of
    silently scoring `None`; a multiple-choice question without choices raises.

    Args:
        extraction (`Any`): the extracted answer (usually from [`extract_answer_mathvista`]).
        choices (`Sequence[str]`, *optional*): the options of a multiple-choice question.
        question_type (`str`): `"multi_choice"` or `"free_form"`.
        answer_type (`str`): `"integer"`, `"float"`, `"list"` or `"text"`.
        precision (`float`, *optional*): decimal places of a float answer (required for `"float"`).
        ignore_empty_extractions (`bool`, *optional*, defaults to `False`): return `None` for an empty
            multiple-choice extraction instead of the most similar option.

    Returns:
        `str` or `None`: the normalized prediction, compared to the ground truth with `==`.
    """
    if question_type == "multi_choice":
        if not choices:
            raise ValueError("A multi_choice question needs its `choices`.")
        choices = [str(c) for c in choices]
        extraction = str(extraction).strip() if extraction is not None else ""
        if ignore_empty_extractions and not extraction:
            return None
        letters = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letters:
            extraction = letters[0].upper()
        options = [chr(ord("A") + i) for i in range(len(choices))]
        if extraction in options:
            return choices[options.index(extraction)]
        return _most_similar(extraction, choices)
    if answer_type == "float" and precision is None:
        raise ValueError("A float answer needs its `precision` (number of decimal places).")
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), int(precision)))
    except (TypeError, ValueError, OverflowError):
        return None
    return None if extraction is None else str(extraction).strip()


def mathvista_score(
    prediction: str,
    answer: str,
    question_type: str = "free_form",
    answer_type: str = "text",
    choices: Optional[Sequence[str]] = None,
    precision: Optional[float] = None,
    ignore_empty_extractions: bool = False,
) -> float:
    """MathVista correctness of one response: [`extract_answer_mathvista`] (rule-based, a DEVIATION from the
    official GPT-4 extraction), then [`normalize_extracted_answer_mathvista`], then `prediction == answer` as
    `safe_equal` in `lupantech/MathVista` `evaluation/calculate_score.py`.

    The ground truth is `str()`-converted (MathVista stores answers as strings: `"14"`, `"1.45"`, an option's
    text). Free-form `"text"` answers (not in MathVista; the default here, for data without MathVista metadata)
    are compared with [`exact_match`] instead of `==`.

    Args:
        prediction (`str`): the model's full response.
        answer (`str`): the ground truth (for `multi_choice`, the option text, as in MathVista).
        question_type (`str`, *optional*, defaults to `"free_form"`): `"multi_choice"` or `"free_form"`.
        answer_type (`str`, *optional*, defaults to `"text"`): `"integer"`, `"float"`, `"list"` or `"text"`.
        choices (`Sequence[str]`, *optional*): the options of a multiple-choice question.
        precision (`float`, *optional*): decimal places of a float answer.
        ignore_empty_extractions (`bool`, *optional*, defaults to `False`): see
            [`normalize_extracted_answer_mathvista`].

    Returns:
        `float`: 1.0 if correct, else 0.0.
    """
    extraction = extract_answer_mathvista(prediction, question_type, answer_type, choices, precision)
    normalized = normalize_extracted_answer_mathvista(
        extraction, choices, question_type, answer_type, precision, ignore_empty_extractions
    )
    if normalized is None:
        return 0.0
    if question_type != "multi_choice" and answer_type not in ("integer", "float", "list"):
        return exact_match(normalized, str(answer))
    return float(normalized == str(answer))


# ---------------------------------------------------------------------------------------------------------- TEDS


@functools.lru_cache(maxsize=None)
def _teds_classes():
    """`(TableTree, TableConfig, APTED, lxml.html)`, built on first use so that `apted` / `lxml` stay optional."""
    try:  # optional packages, needed by `teds` only (see the module docstring)
        from apted import APTED, Config  # noqa: PLC0415 (optional, teds only)
        from apted.helpers import Tree  # noqa: PLC0415 (optional, teds only)
        from lxml import html  # noqa: PLC0415 (optional, teds only)
    except ImportError as error:
        raise ImportError("`teds` needs `apted` and `lxml`: pip install 'apted>=1.0.3' 'lxml>=5'") from error

    class TableTree(Tree):
        """An HTML element for APTED: tag, and for `td` cells colspan, rowspan and content tokens."""

        def __init__(self, tag, colspan=None, rowspan=None, content=None, children=()):
            self.tag, self.colspan, self.rowspan, self.content = tag, colspan, rowspan, content
            self.children = list(children)

    class TableConfig(Config):
        """PubTabNet's `CustomConfig`: renaming costs 1 across tag / colspan / rowspan, else the normalized
        Levenshtein distance of two cells' content tokens."""

        def rename(self, node1, node2):
            if (node1.tag, node1.colspan, node1.rowspan) != (node2.tag, node2.colspan, node2.rowspan):
                return 1.0
            if node1.tag == "td" and (node1.content or node2.content):
                return _normalized_levenshtein(node1.content, node2.content)
            return 0.0

    return TableTree, TableConfig, APTED, html


def _cell_tokens(node) -> List[str]:
    """PubTabNet's `tokenize`: the `<tag>` / `</tag>` markers and characters of an element and its descendants
    (tails of descendants included, the element's own tail not)."""
    tokens = [f"<{node.tag}>"] + list(node.text or "")
    for child in node:
        tokens += _cell_tokens(child)
        if child.tag != "td" and child.tail is not None:
            tokens += list(child.tail)
    if node.tag != "unk":
        tokens.append(f"</{node.tag}>")
    return tokens


def _table_tree(node, structure_only: bool, tree_cls):
    """PubTabNet's `load_html_tree`: every element down to the `td` cells, which become leaves."""
    if node.tag == "td":
        content = [] if structure_only else _cell_tokens(node)[1:-1]
        colspan, rowspan = int(node.attrib.get("colspan", "1")), int(node.attrib.get("rowspan", "1"))
        return tree_cls(node.tag, colspan, rowspan, content)
    return tree_cls(node.tag, None, None, None, [_table_tree(child, structure_only, tree_cls) for child in node])


def teds(pred_html: str, true_html: str, structure_only: bool = False) -> float:
    """Tree-Edit-Distance-based Similarity of two HTML tables: `1 - TED(pred, true) / max(#nodes)`.

    Matches `TEDS.evaluate` of `ibm-aur-nlp/PubTabNet` `src/metric.py`: both documents are parsed with lxml's HTML
    parser (comments removed), the first `body/table` of each is compared; the tree keeps every element down to the
    `td` cells (which are leaves); insert and delete cost 1, renaming costs 1 when the tag, `colspan` or `rowspan`
    differ, otherwise (two `td`) the Levenshtein distance of the cells' content tokens (each character, plus
    `<b>` / `</b>`-style markers of inner elements) divided by the longer token list; `#nodes` counts the elements
    below `table` (`.//*`, inner `td` markup included, the `table` itself not). `structure_only=True` empties
    every cell's content, so only tags and spans count. An empty string, or a document without `body/table`,
    scores 0.0.

    Deviations: the reference's `html.fromstring(text, parser)` passes the parser as `base_url`; here
    `lxml.html.document_fromstring(text, parser=...)` is used, so the comment-removing parser is really applied and
    a bare `<table>...</table>` fragment gets its implicit `<html><body>` (PubTabNet's own data always has them).
    Two empty tables score 1.0 (the reference divides by zero). The reference's `ignore_nodes` option is not
    offered.

    Args:
        pred_html (`str`): the predicted table (HTML).
        true_html (`str`): the ground-truth table (HTML).
        structure_only (`bool`, *optional*, defaults to `False`): ignore cell content (TEDS-S).

    Returns:
        `float`: the similarity, 1.0 for identical tables (can be negative in theory when the edit distance exceeds
        the node count, as in the reference).
    """
    if not pred_html or not true_html:
        return 0.0
    tree_cls, config_cls, apted_cls, html = _teds_classes()
    parser = html.HTMLParser(remove_comments=True, encoding="utf-8")
    pred_tables = html.document_fromstring(pred_html, parser=parser).xpath("body/table")
    true_tables = html.document_fromstring(true_html, parser=parser).xpath("body/table")
    if not pred_tables or not true_tables:
        return 0.0
    pred, true = pred_tables[0], true_tables[0]
    n_nodes = max(len(pred.xpath(".//*")), len(true.xpath(".//*")))
    if n_nodes == 0:  # two empty <table></table>: the reference divides by zero
        return 1.0
    tree_pred = _table_tree(pred, structure_only, tree_cls)
    tree_true = _table_tree(true, structure_only, tree_cls)
    distance = apted_cls(tree_pred, tree_true, config_cls()).compute_edit_distance()
    return 1.0 - float(distance) / n_nodes


# ------------------------------------------------------------------------------------------------------- routing


def _as_list(values: Any) -> list:
    """A list from a list, tuple, numpy array or torch tensor."""
    return values.tolist() if hasattr(values, "tolist") else list(values)


def router_accuracy(predicted: Sequence, target: Sequence) -> float:
    """Fraction of samples whose predicted expert (or domain) equals the target one.

    Reference: `sklearn.metrics.accuracy_score` (`scikit-learn/scikit-learn` `sklearn/metrics/_classification.py`)
    for 1-D labels, unnormalized weights; empty input raises instead of returning 0.

    Args:
        predicted (`Sequence`): predicted labels (ints or strings; list, tuple, numpy array or tensor).
        target (`Sequence`): true labels, same length.

    Returns:
        `float`: accuracy in `[0, 1]`.
    """
    predicted, target = _as_list(predicted), _as_list(target)
    if len(predicted) != len(target):
        raise ValueError(f"`predicted` has {len(predicted)} labels but `target` has {len(target)}.")
    if not target:
        raise ValueError("router_accuracy of an empty sequence is undefined.")
    return sum(p == t for p, t in zip(predicted, target)) / len(target)


def confusion_matrix(predicted: Sequence, target: Sequence, labels: Sequence) -> List[List[int]]:
    """Counts of (true label, predicted label) pairs: `matrix[i][j]` = samples of true label `labels[i]` that were
    predicted as `labels[j]`. Rows are TRUE labels, columns PREDICTED labels, in the order of `labels`; the diagonal
    holds the correct predictions.

    Reference: `sklearn.metrics.confusion_matrix(y_true, y_pred, labels=labels)` (`scikit-learn/scikit-learn`
    `sklearn/metrics/_classification.py`), same orientation. Deviation: a label missing from `labels` raises
    instead of being silently dropped (a router choosing an unknown expert is a bug worth seeing).

    Args:
        predicted (`Sequence`): predicted labels (list, tuple, numpy array or tensor).
        target (`Sequence`): true labels, same length.
        labels (`Sequence`): every label, in row / column order.

    Returns:
        `List[List[int]]`: a `len(labels) x len(labels)` nested list of counts.
    """
    predicted, target, labels = _as_list(predicted), _as_list(target), _as_list(labels)
    if len(predicted) != len(target):
        raise ValueError(f"`predicted` has {len(predicted)} labels but `target` has {len(target)}.")
    index = {label: i for i, label in enumerate(labels)}
    if len(index) != len(labels):
        raise ValueError(f"`labels` has duplicates: {labels}.")
    unknown = sorted({str(x) for x in predicted + target if x not in index})
    if unknown:
        raise ValueError(f"Labels {unknown} are not in `labels` ({labels}).")
    matrix = [[0] * len(labels) for _ in labels]
    for p, t in zip(predicted, target):
        matrix[index[t]][index[p]] += 1
    return matrix


# ---------------------------------------------------------------------------------------------------- dispatcher

METRICS: Mapping[str, Callable[..., float]] = MappingProxyType(
    {
        "relaxed_accuracy": relaxed_accuracy,
        "anls": anls,
        "exact_match": exact_match,
        "ocrbench": ocrbench_match,
        "mathvista": mathvista_score,
        "teds": teds,
        "teds_structure": functools.partial(teds, structure_only=True),
    }
)
"""Metric name -> per-sample function `(prediction, target_or_targets, **kwargs) -> float`."""

DEFAULT_DOMAIN_METRICS: Mapping[str, str] = MappingProxyType(
    {
        "chart": "relaxed_accuracy",
        "table": "teds",
        "math": "mathvista",
        "document": "anls",
        "ocr": "ocrbench",
        "general": "exact_match",
    }
)
"""Expert domain -> name in `METRICS` of its standard metric (`table` answers are HTML tables, scored by TEDS)."""

DOMAINS: tuple[str, ...] = tuple(DEFAULT_DOMAIN_METRICS)
"""The project's one domain vocabulary (models' default domains, data, metrics, configs): chart, table, math,
document, ocr, general. Other names work where a metric is named for them (`train.evaluate --metric name=...`)."""


def score(metric_name: str, prediction: Any, target_or_targets: Any, **kwargs) -> float:
    """Score one sample with the metric called `metric_name` in `METRICS`.

    Args:
        metric_name (`str`): a key of `METRICS` (e.g. a value of `DEFAULT_DOMAIN_METRICS`).
        prediction (`Any`): the model's answer (the predicted HTML for TEDS, the full response for MathVista).
        target_or_targets (`Any`): the ground truth, or a list of them where the metric accepts several.
        kwargs: metric options, e.g. `tolerance=`, `threshold=`, `dataset_name=`, `structure_only=`, MathVista's
            `question_type=` / `answer_type=` / `choices=` / `precision=`.

    Returns:
        `float`: the sample's score in `[0, 1]`.
    """
    if metric_name not in METRICS:
        raise ValueError(f"Unknown metric {metric_name!r}; available: {sorted(METRICS)}.")
    return float(METRICS[metric_name](prediction, target_or_targets, **kwargs))


def score_row(metric_name: str, prediction: Any, row: Mapping[str, Any]) -> float:
    """Score one prediction against a dataset row (the project's row format: `answer`, and optionally `html` and
    MathVista's `question_type` / `answer_type` / `choices` / `precision`): TEDS (`teds` and `teds_structure` alike)
    compares with the row's `html` when it has one, MathVista reads its metadata (`choices` may be a JSON string, as
    the exported JSONL stores it). Raises what the metric raises on a malformed prediction; `train.evaluate` and the
    preference-pair builder both score through here, so a model is judged the same way in evaluation and in its DPO
    data."""
    target = row["html"] if metric_name in ("teds", "teds_structure") and row.get("html") else row["answer"]
    extra = {}
    if metric_name == "mathvista":
        keys = ("question_type", "answer_type", "choices", "precision")
        extra = {k: row.get(k) for k in keys if row.get(k) is not None}
        if isinstance(extra.get("choices"), str):
            extra["choices"] = json.loads(extra["choices"]) if extra["choices"] else None
    return score(metric_name, prediction, target, **extra)
