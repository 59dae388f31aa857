"""Evaluation metrics: hand-computed values for every metric, the reference implementations' edge cases included."""

import numpy as np
import pytest

from evaluation.metrics import (
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
    score_row,
    teds,
)


def table(*rows: str, wrap: bool = False) -> str:
    """`table("<td>a</td><td>b</td>", ...)`: one argument per row."""
    html = "<table>" + "".join(f"<tr>{row}</tr>" for row in rows) + "</table>"
    return f"<html><body>{html}</body></html>" if wrap else html


# ---------------------------------------------------------------------------------------------------- levenshtein


@pytest.mark.parametrize(
    "a,b,expected",
    [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "", 3), ("", "", 0), ("flaw", "lawn", 2), ("abc", "abc", 0)],
)
def test_levenshtein_strings(a, b, expected):
    assert levenshtein(a, b) == expected
    assert levenshtein(b, a) == expected


def test_levenshtein_token_lists():
    assert levenshtein(["<b>", "a", "b", "</b>", "x"], ["a", "b"]) == 3
    assert levenshtein(["ab", "c"], ["ab", "d"]) == 1


# ----------------------------------------------------------------------------------------------- relaxed accuracy


@pytest.mark.parametrize(
    "prediction,target,expected",
    [
        ("105", "100", 1.0),  # exactly 5% above: inclusive bound (reference `<=`)
        ("95", "100", 1.0),  # exactly 5% below
        ("21", "20", 1.0),  # 1 / 20 = 0.05
        ("105.01", "100", 0.0),  # just outside
        ("94.99", "100", 0.0),
        ("21.01", "20", 0.0),
        ("-3.1", "-3", 1.0),  # |0.1| / 3 = 0.033
        ("100", "100", 1.0),
    ],
)
def test_relaxed_accuracy_five_percent_bound(prediction, target, expected):
    assert relaxed_accuracy(prediction, target) == expected


def test_relaxed_accuracy_custom_tolerance():
    assert relaxed_accuracy("110", "100") == 0.0
    assert relaxed_accuracy("110", "100", tolerance=0.1) == 1.0
    assert relaxed_accuracy("100.5", "100", tolerance=0.0) == 0.0


@pytest.mark.parametrize(
    "prediction,target,expected",
    [
        ("1,000", "1000", 1.0),
        ("1000", "1,000", 1.0),
        ("12,345.5", "12345.5", 1.0),
        ("1,049", "1,000", 1.0),  # 4.9% off once both are numbers
        ("1,2", "12", 0.0),  # not a thousands group: compared as strings
    ],
)
def test_relaxed_accuracy_thousands_separators(prediction, target, expected):
    assert relaxed_accuracy(prediction, target) == expected


@pytest.mark.parametrize(
    "prediction,target,expected",
    [
        ("12%", "0.12", 1.0),  # the reference divides a percentage by 100
        ("12%", "12%", 1.0),
        ("12.5%", "12%", 1.0),  # 0.125 vs 0.12: 4.2% off
        ("12%", "12", 0.0),  # 0.12 vs 12
        ("12", "12%", 0.0),
    ],
)
def test_relaxed_accuracy_percent_sign(prediction, target, expected):
    assert relaxed_accuracy(prediction, target) == expected


@pytest.mark.parametrize(
    "prediction,target,expected",
    [("0", "0", 1.0), (" 0 ", "0", 1.0), ("0.0", "0", 0.0), ("0.01", "0", 0.0), ("0%", "0", 0.0)],
)
def test_relaxed_accuracy_zero_target_needs_the_same_string(prediction, target, expected):
    assert relaxed_accuracy(prediction, target) == expected


def test_relaxed_accuracy_non_numeric_and_multiple_targets():
    assert relaxed_accuracy("Yes", "yes") == 1.0
    assert relaxed_accuracy(" Blue ", "blue") == 1.0
    assert relaxed_accuracy("blue", "green") == 0.0
    assert relaxed_accuracy("12", "twelve") == 0.0
    assert relaxed_accuracy("10", ["abc", "10.4"]) == 1.0
    assert relaxed_accuracy("10", ["abc", "11"]) == 0.0
    assert relaxed_accuracy(105, "100") == 1.0  # non-string predictions are str()-converted
    with pytest.raises(ValueError):
        relaxed_accuracy("1", [])


# ---------------------------------------------------------------------------------------------------------- ANLS


@pytest.mark.parametrize(
    "prediction,targets,expected",
    [
        ("Denver Broncos", "denver broncos", 1.0),
        ("  Denver   Broncos ", "Denver Broncos", 1.0),  # stripped, inner whitespace collapsed
        ("abcx", "abcd", 0.75),  # NL = 1 / 4
        ("12/15/89", "12/15/88", 0.875),  # NL = 1 / 8
        ("abcxy", "abcde", 0.6),  # NL = 2 / 5
        ("abxy", "abcd", 0.5),  # NL = 2 / 4 = 0.5 exactly: kept (reference: `if 1 - NL < 0.5: 0`)
        ("axyz", "abcd", 0.0),  # NL = 3 / 4 > 0.5
        ("abcdefg", "abc", 0.0),  # NL = 4 / 7 > 0.5
    ],
)
def test_anls_single_answer(prediction, targets, expected):
    assert anls(prediction, targets) == pytest.approx(expected, abs=1e-12)


def test_anls_threshold_edge_follows_the_official_script():
    assert anls("abxy", "abcd", threshold=0.5) == 0.5
    assert anls("abxy", "abcd", threshold=0.51) == 0.0
    assert anls("axyz", "abcd", threshold=0.25) == 0.25  # 1 - 3 / 4 == 0.25, kept at its own threshold


def test_anls_multiple_ground_truths_takes_the_best():
    assert anls("Dear dr. Lobo", ["Dear Dr. Lobo", "Dr. Lobo"]) == 1.0
    assert anls("abcx", ["zzzz", "abcd", "abxy"]) == 0.75  # 0, 1 - 1/4, 1 - 2/4
    assert anls("abxy", ["zzzz", "abcd"]) == 0.5
    assert anls("qqqq", ["zzzz", "abcd"]) == 0.0


def test_anls_empty_prediction():
    assert anls("", "abc") == 0.0
    assert anls("   ", "abc") == 0.0
    assert anls("", ["abc", ""]) == 1.0  # an empty ground truth matches an empty answer
    assert anls("", "") == 1.0
    with pytest.raises(ValueError):
        anls("abc", [])


# --------------------------------------------------------------------------------------------------- exact match


def test_normalize_answer():
    assert normalize_answer("  The  Cat. ") == "the cat"
    assert normalize_answer("A\n b.") == "a b"
    assert normalize_answer("U.S.") == "u.s"
    assert normalize_answer("3..") == "3."  # one trailing period only
    assert normalize_answer(42) == "42"


@pytest.mark.parametrize(
    "prediction,target,expected",
    [
        ("  The  Cat. ", "the cat", 1.0),
        ("cat", "cats", 0.0),
        ("U.S.", "u.s", 1.0),
        ("3.", "3", 1.0),
        ("3..", "3", 0.0),
        ("b", ["a", "B"], 1.0),
        ("c", ["a", "B"], 0.0),
        ("", "", 1.0),
        ("", "a", 0.0),
    ],
)
def test_exact_match(prediction, target, expected):
    assert exact_match(prediction, target) == expected


# ------------------------------------------------------------------------------------------------------ OCRBench


@pytest.mark.parametrize(
    "prediction,targets,kwargs,expected",
    [
        ("The text says HELLO world", "hello", {}, 1.0),
        ("hello", "hello world", {}, 0.0),  # the ground truth must be inside the prediction
        ("line one\nline two", "one line", {}, 1.0),  # newline -> space, then substring
        ("answer: 42", ["41", "42"], {}, 1.0),
        ("answer: 43", ["41", "42"], {}, 0.0),
        ("x ^ { 2 }", "x^{2}", {}, 0.0),  # spaces kept outside HME100k
        ("X^{2}", "x^{2}", {}, 1.0),  # lowercased outside HME100k
        ("x ^ { 2 } +\n1", "x^{2}+1", {"dataset_name": "HME100k"}, 1.0),  # spaces and newlines removed
        ("X^{2}", "x^{2}", {"dataset_name": "HME100k"}, 0.0),  # case-sensitive for HME100k
        ("x ^ { 2 }", "x^{2}", {"dataset_name": "IIIT5K"}, 0.0),
    ],
)
def test_ocrbench_match(prediction, targets, kwargs, expected):
    assert ocrbench_match(prediction, targets, **kwargs) == expected


# ----------------------------------------------------------------------------------------------------- MathVista

CHOICES = ["3/11", "8/11", "6/11", "3/5"]


@pytest.mark.parametrize(
    "response,expected",
    [
        ("B", "B"),
        ("(C)", "C"),
        ("D.", "D"),
        ("B) 8/11", "B"),
        ("The answer is (B)", "B"),
        ("The correct answer is (B) 8/11.", "B"),
        ("Answer: D", "D"),
        ("The correct option is C because the shaded part is 6 of 11.", "C"),
        ("Counting the parts, (A) is too small and (B) fits.", "B"),  # last parenthesized letter
        ("It is 8/11 of the shape.", "8/11"),  # the only option mentioned
        ("8/11", "8/11"),  # the response is a choice
        ('The answer is "6/11".', "6/11"),  # the reference's quick-extract rule
        ("The answer is \\boxed{C}.", "C"),
    ],
)
def test_extract_answer_mathvista_multiple_choice(response, expected):
    assert extract_answer_mathvista(response, "multi_choice", "text", choices=CHOICES) == expected


def test_extract_answer_mathvista_multiple_choice_fallbacks():
    # An article is not an option letter; nothing found -> the stripped response, for the most-similar rule.
    assert extract_answer_mathvista("A square has four sides.", "multi_choice", "text", ["3", "5"]) == (
        "A square has four sides"
    )
    # Two options mentioned: ambiguous, so no option text is picked.
    assert extract_answer_mathvista("Either 3/11 or 8/11", "multi_choice", "text", CHOICES) == "Either 3/11 or 8/11"
    # Letters beyond the options are ignored ("(E)" with four options).
    assert extract_answer_mathvista("(E)", "multi_choice", "text", CHOICES) == "(E)"
    assert extract_answer_mathvista("", "multi_choice", "text", CHOICES) == ""


@pytest.mark.parametrize(
    "response,expected",
    [
        ("14", "14"),
        ("The number missing in the sequence is 14.", "14"),
        ("There are 3 red and 5 blue balls, so 8 in total.", "8"),  # last number
        ("The answer is 7. Check: 3 + 4 = 7, and 2 more rows of 9.", "7"),  # first number after the cue
        ("About 1,234 people attended.", "1234"),
        ("So x = \\boxed{42}, not 7.", "42"),
        ("The temperature drops to -5 degrees.", "-5"),
        ("I cannot tell.", "I cannot tell"),  # no number: normalization turns this into None
    ],
)
def test_extract_answer_mathvista_integers_in_text(response, expected):
    assert extract_answer_mathvista(response, "free_form", "integer") == expected


@pytest.mark.parametrize(
    "response,precision,extracted,normalized",
    [
        ("Luca needs $1.45 to buy a sour apple candy and a butterscotch candy.", 2, "1.45", "1.45"),
        ("The fraction is 0.6, which means six out of ten.", 1, "0.6", "0.6"),
        ("The ratio is 0.456", 1, "0.456", "0.5"),
        ("The ratio is 0.456", 2, "0.456", "0.46"),
        ("The length is 1.40 m", 2, "1.40", "1.4"),  # str(round(...)) drops the trailing zero, as the reference
        ("2.5", 1, "2.5", "2.5"),
        ("The slope is 3", 1, "3", "3.0"),
    ],
)
def test_mathvista_floats_with_precision(response, precision, extracted, normalized):
    extraction = extract_answer_mathvista(response, "free_form", "float", precision=precision)
    assert extraction == extracted
    assert normalize_extracted_answer_mathvista(extraction, None, "free_form", "float", precision) == normalized


def test_extract_answer_mathvista_lists_and_text():
    assert extract_answer_mathvista("The peak is between 2007 and 2008.", "free_form", "list") == "[2007, 2008]"
    assert extract_answer_mathvista("It is [1, 2, 3].", "free_form", "list") == "[1, 2, 3]"
    assert extract_answer_mathvista("The answer is: upward.", "free_form", "text") == "upward"
    assert extract_answer_mathvista(" Positive. ", "free_form", "text") == "Positive"


def test_normalize_extracted_answer_mathvista():
    norm = normalize_extracted_answer_mathvista
    assert norm("B", CHOICES, "multi_choice", "text") == "8/11"
    assert norm("(b) 8/11", CHOICES, "multi_choice", "text") == "8/11"  # "(X)" letters are upper-cased
    assert norm("8/12", CHOICES, "multi_choice", "text") == "8/11"  # most similar option
    assert norm("", CHOICES, "multi_choice", "text") == "3/5"  # most similar to "": the shortest option
    assert norm("", CHOICES, "multi_choice", "text", ignore_empty_extractions=True) is None
    assert norm("3.0", None, "free_form", "integer") == "3"
    assert norm("3.7", None, "free_form", "integer") == "3"  # int(float(x)) truncates
    assert norm("abc", None, "free_form", "integer") is None
    assert norm("abc", None, "free_form", "float", 2) is None
    assert norm("[2007, 2008]", None, "free_form", "list") == "[2007, 2008]"
    with pytest.raises(ValueError, match="precision"):
        norm("1.5", None, "free_form", "float")
    with pytest.raises(ValueError, match="choices"):
        norm("A", [], "multi_choice", "text")


@pytest.mark.parametrize(
    "response,answer,kwargs,expected",
    [
        ("The correct answer is (B) 8/11.", "8/11", {"question_type": "multi_choice", "choices": CHOICES}, 1.0),
        ("The correct answer is (A).", "8/11", {"question_type": "multi_choice", "choices": CHOICES}, 0.0),
        ("The number missing in the sequence is 14.", "14", {"answer_type": "integer"}, 1.0),
        ("The number missing in the sequence is 15.", "14", {"answer_type": "integer"}, 0.0),
        ("I cannot tell.", "14", {"answer_type": "integer"}, 0.0),
        ("It costs $1.449.", "1.45", {"answer_type": "float", "precision": 2}, 1.0),
        ("It costs $1.44.", "1.45", {"answer_type": "float", "precision": 2}, 0.0),
        ("The peak is between 2007 and 2008.", "[2007, 2008]", {"answer_type": "list"}, 1.0),
        ("Positive.", "positive", {}, 1.0),  # free-form text: exact_match normalization
        ("negative", "positive", {}, 0.0),
        ("14", 14, {"answer_type": "integer"}, 1.0),  # a numeric ground truth is str()-converted
    ],
)
def test_mathvista_score(response, answer, kwargs, expected):
    assert mathvista_score(response, answer, **kwargs) == expected


# ---------------------------------------------------------------------------------------------------------- TEDS

TRUE_1x2 = table("<td>a</td><td>b</td>")


def test_teds_identical_tables():
    true = table("<td>Name</td><td>Value</td>", '<td colspan="2">total 3</td>')
    assert teds(true, true) == 1.0
    assert teds(true, true, structure_only=True) == 1.0
    assert teds(table("<td>a</td>", wrap=True), table("<td>a</td>")) == 1.0  # fragment == full document
    assert teds(table("<td>a<!-- note --></td>"), table("<td>a</td>")) == 1.0  # comments removed


def test_teds_structure_only_ignores_content():
    pred = table("<td>x</td><td>yy</td>")
    assert teds(pred, TRUE_1x2, structure_only=True) == 1.0
    # Full TEDS: nodes below <table>: tr, td, td = 3; renames a->x (1/1) and b->yy (lev 2 / len 2 = 1): 1 - 2/3.
    assert teds(pred, TRUE_1x2) == pytest.approx(1 / 3)


def test_teds_hand_computed_value():
    # true: [[a, b], [c, d]]   pred: [[a, bb], [c]]
    # Nodes below <table> (`.//*`): true 2 tr + 4 td = 6, pred 2 tr + 3 td = 5 -> max 6.
    # Edit script: rename td(bb) -> td(b): Levenshtein(["b", "b"], ["b"]) / 2 = 0.5; insert td(d): 1.
    # No cheaper mapping (one insertion is forced; bb matches no other cell better), so TED = 1.5.
    # TEDS = 1 - 1.5 / 6 = 0.75; structure only: TED = 1 (the insertion) -> 1 - 1/6 = 5/6.
    true = table("<td>a</td><td>b</td>", "<td>c</td><td>d</td>")
    pred = table("<td>a</td><td>bb</td>", "<td>c</td>")
    assert teds(pred, true) == pytest.approx(0.75)
    assert teds(pred, true, structure_only=True) == pytest.approx(5 / 6)


def test_teds_partial_cell_content():
    # One row, two cells: tr, td, td = 3 nodes; "cd" -> "ce" costs 1/2: TEDS = 1 - 0.5/3 = 5/6.
    assert teds(table("<td>ab</td><td>ce</td>"), table("<td>ab</td><td>cd</td>")) == pytest.approx(5 / 6)


def test_teds_inner_markup_counts_as_tokens_and_nodes():
    # pred nodes: tr, td, b = 3. Cell tokens ["<b>", "a", "b", "</b>", "x"] vs ["a", "b"]: 3 edits / 5 = 0.6.
    # TEDS = 1 - 0.6 / 3 = 0.8.
    assert teds(table("<td><b>ab</b>x</td>"), table("<td>ab</td>")) == pytest.approx(0.8)


def test_teds_decreases_with_a_missing_cell():
    pred = table("<td>a</td>")
    # Delete td(b): TED 1 over max(2, 3) = 3 nodes.
    assert teds(pred, TRUE_1x2) == pytest.approx(2 / 3)
    assert teds(pred, TRUE_1x2, structure_only=True) == pytest.approx(2 / 3)
    assert teds(pred, TRUE_1x2) < teds(TRUE_1x2, TRUE_1x2)


def test_teds_colspan_and_rowspan_matter():
    # A spanning cell instead of two cells: rename with a different colspan (1) + delete one td (1) = 2 over 3.
    merged = table('<td colspan="2">a</td>')
    assert teds(merged, TRUE_1x2) == pytest.approx(1 / 3)
    assert teds(merged, TRUE_1x2, structure_only=True) == pytest.approx(1 / 3)
    # Same cells, only the span differs: 2 tr + 3 td = 5 nodes, one rename of cost 1 -> 0.8, content or not.
    true = table('<td colspan="2">a</td>', "<td>b</td><td>c</td>")
    pred = table("<td>a</td>", "<td>b</td><td>c</td>")
    assert teds(pred, true) == pytest.approx(0.8)
    assert teds(pred, true, structure_only=True) == pytest.approx(0.8)
    true_rows = table('<td rowspan="2">a</td><td>b</td>', "<td>c</td>")
    pred_rows = table("<td>a</td><td>b</td>", "<td>c</td>")
    assert teds(pred_rows, true_rows, structure_only=True) == pytest.approx(0.8)
    assert teds(true_rows, true_rows) == 1.0


def test_teds_without_a_table_is_zero():
    assert teds("", TRUE_1x2) == 0.0
    assert teds(TRUE_1x2, "") == 0.0
    assert teds("<p>no table here</p>", TRUE_1x2) == 0.0


# ------------------------------------------------------------------------------------------------------- routing


def test_router_accuracy():
    assert router_accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    assert router_accuracy(np.array([1, 1]), np.array([1, 1])) == 1.0
    assert router_accuracy(["chart", "table"], ["table", "table"]) == 0.5
    with pytest.raises(ValueError):
        router_accuracy([0, 1], [0])
    with pytest.raises(ValueError):
        router_accuracy([], [])


def test_confusion_matrix_rows_are_true_labels():
    predicted = [0, 1, 1, 2, 0]
    target = [0, 1, 2, 2, 2]
    # true 0 -> predicted 0; true 1 -> 1; true 2 -> predicted 1, 2, 0.
    assert confusion_matrix(predicted, target, [0, 1, 2]) == [[1, 0, 0], [0, 1, 0], [1, 1, 1]]
    # Label order sets the row / column order.
    assert confusion_matrix(predicted, target, [2, 1, 0]) == [[1, 1, 1], [0, 1, 0], [0, 0, 1]]
    assert confusion_matrix(np.array(predicted), np.array(target), range(3)) == [[1, 0, 0], [0, 1, 0], [1, 1, 1]]
    matrix = confusion_matrix(["chart", "chart", "table"], ["chart", "table", "table"], ["chart", "table"])
    assert matrix == [[1, 0], [1, 1]]  # one "table" image routed to "chart": row table, column chart
    with pytest.raises(ValueError, match="not in `labels`"):
        confusion_matrix([3], [0], [0, 1])
    with pytest.raises(ValueError):
        confusion_matrix([0, 1], [0], [0, 1])


# ---------------------------------------------------------------------------------------------------- dispatcher


def test_default_domain_metrics():
    assert dict(DEFAULT_DOMAIN_METRICS) == {
        "chart": "relaxed_accuracy",
        "document": "anls",
        "ocr": "ocrbench",
        "math": "mathvista",
        "table": "teds",
        "general": "exact_match",
    }
    assert set(DEFAULT_DOMAIN_METRICS.values()) <= set(METRICS)
    with pytest.raises(TypeError):
        DEFAULT_DOMAIN_METRICS["chart"] = "anls"  # a constant


def test_score_dispatches_by_name():
    assert score("relaxed_accuracy", "105", "100") == 1.0
    assert score("relaxed_accuracy", "110", "100", tolerance=0.1) == 1.0
    assert score("anls", "abcx", ["abcd", "zz"]) == 0.75
    assert score("exact_match", "The Cat.", "the cat") == 1.0
    assert score("ocrbench", "x ^ 2", "x^2", dataset_name="HME100k") == 1.0
    assert score("mathvista", "The answer is (B)", "8/11", question_type="multi_choice", choices=CHOICES) == 1.0
    assert score("teds", table("<td>a</td>"), TRUE_1x2) == pytest.approx(2 / 3)
    assert score("teds_structure", table("<td>x</td><td>y</td>"), TRUE_1x2) == 1.0
    assert isinstance(score("exact_match", "a", "a"), float)
    with pytest.raises(ValueError, match="Unknown metric"):
        score("bleu", "a", "a")


def test_targets_may_be_a_numpy_array():
    assert anls("abcx", np.array(["zzzz", "abcd"])) == 0.75
    assert exact_match("b", np.array(["a", "B"])) == 1.0


def test_score_row_compares_both_teds_metrics_with_the_rows_html():
    # A table row: `answer` is the short text answer, `html` the table TEDS compares with.
    row = {"answer": "2 columns", "html": TRUE_1x2}
    assert score_row("teds", TRUE_1x2, row) == 1.0
    assert score_row("teds_structure", TRUE_1x2, row) == 1.0  # was 0.0: compared with "2 columns"
    other_text = table("<td>x</td><td>y</td>")
    assert score_row("teds_structure", other_text, row) == 1.0
    assert score_row("teds", other_text, row) == pytest.approx(teds(other_text, TRUE_1x2))
    assert score_row("teds", other_text, row) < 1.0
    # no `html`: the answer is the target, for both
    assert score_row("teds_structure", TRUE_1x2, {"answer": TRUE_1x2, "html": ""}) == 1.0
    assert score_row("teds_structure", TRUE_1x2, {"answer": "2 columns"}) == 0.0
    assert score_row("exact_match", "2 columns", row) == 1.0  # other metrics keep using `answer`
