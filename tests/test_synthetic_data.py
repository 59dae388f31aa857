"""The synthetic six-domain image-QA set: determinism, sizes, answers that match the source data, one schema,
DatasetDict splits, save / load, DPO pairs, and domains that simple image statistics separate."""

import json
import re

import numpy as np
import pytest

from chimera_mixpert.data.synthetic import (
    CATEGORIES,
    CHART_TYPES,
    COLORS,
    DOMAINS,
    FEATURES,
    IMAGE_KINDS,
    KIND_QUESTIONS,
    MIXED_LAYOUTS,
    QUESTION_KINDS,
    WORDS,
    build_dataset,
    chart_table_text,
    generate_sample,
    load_dataset,
    make_preference_pairs,
    sample_rng,
    save_dataset,
    to_messages,
)

ALL = DOMAINS + ("mixed",)


def sample(domain, index, seed=0, size=64, **kwargs):
    return generate_sample(domain, sample_rng(seed, "train", domain, index), size, **kwargs)


def pixels(s):
    return np.asarray(s["image"])


def text_fields(s):
    return {k: v for k, v in s.items() if k != "image"}


def html_rows(html):
    """`<table><tr><td>..</td></tr></table>` -> [[(text, colspan), ...], ...]."""
    assert html.startswith("<table>") and html.endswith("</table>")
    rows = re.findall(r"<tr>(.*?)</tr>", html)
    assert "".join(f"<tr>{r}</tr>" for r in rows) == html[len("<table>"):-len("</table>")]
    return [[(t, int(span or 1)) for span, t in re.findall(r'<td(?: colspan="(\d+)")?>(.*?)</td>', r)] for r in rows]


def check_answer(s):
    """Re-derive the answer of a sample from its question and its recorded source data."""
    q, a, kind, data = s["question"], s["answer"], s["question_kind"], json.loads(s["data"])
    check_answer_format(s, q, a)
    DOMAIN_CHECKS.get(s["domain"], check_general_answer)(s, q, a, kind, data)


def check_answer_format(s, q, a):
    if s["question_type"] == "multi_choice":
        assert a in s["choices"] and len(set(s["choices"])) == len(s["choices"]) >= 2
        assert all(f") {c}" in q for c in s["choices"])
    else:
        assert s["choices"] == []
    if s["answer_type"] == "integer":
        assert re.fullmatch(r"-?\d+", a)
    if s["answer_type"] == "float":
        assert s["precision"] == 1 and re.fullmatch(r"-?\d+\.\d", a)
    else:
        assert s["precision"] is None


def check_chart_answer(s, q, a, kind, data):
    cats, values = data["categories"], data["values"]
    assert cats == list(CATEGORIES[:len(values)]) and all(1 <= v <= 9 for v in values)
    expected = {
        "max": cats[int(np.argmax(values))], "min": cats[int(np.argmin(values))], "count": str(len(values)),
        "type": data["chart_type"], "to_table": chart_table_text(data),
    }
    if kind == "value":
        assert data["chart_type"] != "pie"
        cat = re.fullmatch(r"What is the value of ([A-E])\?", q).group(1)
        assert a == str(values[cats.index(cat)])
    else:
        assert a == expected[kind]


def check_table_answer(s, q, a, kind, data):
    rows = html_rows(s["html"])
    assert s["html"] == data["html"] and len(rows) == data["rows"]
    width = sum(span for _, span in rows[-1])
    assert all(sum(span for _, span in r) == width for r in rows) and width == data["cols"]
    if kind == "cell":
        r, c = map(int, re.fullmatch(r"What is in row (\d+), column (\d+)\?", q).groups())
        assert rows[r - 1][c - 1] == (a, 1)
    elif kind == "rows":
        assert a == str(len(rows))
    elif kind == "cols":
        assert a == str(width)
    elif kind == "top_row":
        assert rows[0] == [(a, width)] and width > 1
    else:
        assert kind == "to_html" and a == s["html"]


def check_math_answer(s, q, a, kind, data):
    fig = data["figure"]
    if kind == "triangle_angle":
        marked_1, marked_2, x = data["angles"]
        assert marked_1 + marked_2 + x == 180 and a == str(x) and fig == "triangle"
    elif kind == "polygon_sides":
        assert a == str(data["sides"]) and 3 <= data["sides"] <= 8
    elif kind in ("segment_total", "segment_part"):
        p, r = data["parts"]
        name = re.search(r"length of (AB|AC|CB)", q).group(1)
        assert a == str({"AB": p + r, "AC": p, "CB": r}[name])
    elif kind == "slope_sign":
        assert a == ("positive" if data["slope"] > 0 else "negative")
    elif kind == "slope":
        assert float(a) == data["slope"]
    elif kind == "intercept":
        assert a == str(data["intercept"])
    elif kind == "parabola_direction":
        assert a == ("upward" if data["a"] > 0 else "downward")
    else:
        assert a == str(data["vertex"][0 if kind == "vertex_x" else 1]) and fig == "parabola"


def check_document_answer(s, q, a, kind, data):
    title = data["title"]
    assert 1 <= len(title.split()) <= 2 and all(w in WORDS for w in title.split())
    expected = {"title": title, "title_words": str(len(title.split())), "paragraphs": str(len(data["paragraphs"]))}
    assert a == expected[kind]


def check_ocr_answer(s, q, a, kind, data):
    assert kind == "transcribe" and a == data["text"]
    assert a in WORDS or (a.isdigit() and 0 <= int(a) <= 20)


def check_general_answer(s, q, a, kind, data):
    shapes = data["shapes"]
    if kind == "count_all":
        assert a == str(len(shapes))
    elif kind == "count_shape":
        shape = re.fullmatch(r"How many (\w+)s are there\?", q).group(1)
        assert a == str(sum(x["shape"] == shape for x in shapes))
    elif kind == "count_color_shape":
        color, shape = re.fullmatch(r"How many (\w+) (\w+)s are there\?", q).groups()
        assert color in COLORS and a == str(sum(x["shape"] == shape and x["color"] == color for x in shapes))
    else:
        shape = re.fullmatch(r"What color is the (\w+)\?", q).group(1)
        (only,) = [x for x in shapes if x["shape"] == shape]
        assert a == only["color"]


# The other domain (general) is checked by `check_general_answer`.
DOMAIN_CHECKS = {"chart": check_chart_answer, "table": check_table_answer, "math": check_math_answer,
                 "document": check_document_answer, "ocr": check_ocr_answer}


# ------------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("domain", ALL)
def test_same_seed_same_sample_and_other_seed_differs(domain):
    first = [sample(domain, i) for i in range(4)]
    # other samples in between (the chart figures are reused): generation order must not matter
    for i in range(3, -1, -1):
        again = sample(domain, i)
        assert np.array_equal(pixels(again), pixels(first[i])) and text_fields(again) == text_fields(first[i])
    other = [sample(domain, i, seed=1) for i in range(4)]
    for a, b in zip(first, other):
        assert not np.array_equal(pixels(a), pixels(b))
    assert len({s["data"] for s in first + other}) == 8


def test_split_domain_and_index_give_distinct_generators():
    draws = {(split, d, i): sample_rng(0, split, d, i).integers(2**62)
             for split in ("train", "validation", "test", "mixed") for d in ALL for i in range(3)}
    assert len(set(draws.values())) == len(draws)


def test_a_domain_subset_gives_the_same_rows():
    full = build_dataset({"train": 2}, mixed=0, seed=5)["train"]
    only = build_dataset({"train": 2}, mixed=0, seed=5, domains=("ocr", "chart"))["train"]
    by_id = {r["id"]: r for r in full}
    for row in only:
        ref = by_id[row["id"]]
        assert row["question"] == ref["question"] and row["answer"] == ref["answer"]
        assert np.array_equal(np.asarray(row["image"]), np.asarray(ref["image"]))


# ---------------------------------------------------------------------------------------------- sizes and looks


@pytest.mark.parametrize("size", [32, 64, 128])
def test_every_domain_renders_at_each_size(size):
    for domain in ALL:
        for i in range(6):
            s = sample(domain, i, size=size)
            assert s["image"].mode == "RGB" and s["image"].size == (size, size)
            assert pixels(s).std() > 5, (domain, i)  # something is drawn
            ref = sample(domain, i, size=64)
            assert text_fields(s)["question"] == ref["question"] and s["answer"] == ref["answer"]


def test_mixed_layouts_render_each_domain_pair():
    seen = set()
    for layout, pair in MIXED_LAYOUTS.items():
        for i in range(6):
            s = generate_sample("mixed", sample_rng(0, "mixed", "mixed", i), 64, layout=layout)
            assert {s["domain"], s["secondary_domain"]} == set(pair)
            assert json.loads(s["data"])["layout"] == layout
            seen.add((layout, s["domain"]))
            check_answer(s)
    assert len(seen) == 2 * len(MIXED_LAYOUTS)
    with pytest.raises(ValueError, match="Unknown mixed layout"):
        generate_sample("mixed", 0, layout="poster")


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="Unknown domain"):
        generate_sample("video", 0)
    with pytest.raises(ValueError, match="at least 16"):
        generate_sample("chart", 0, image_size=8)
    with pytest.raises(ValueError, match="Unknown or no domains"):
        build_dataset({"train": 1}, domains=("chart", "audio"))
    with pytest.raises(ValueError, match="unknown splits"):
        build_dataset({"dev": 1})
    with pytest.raises(ValueError, match="No mixed layout"):
        build_dataset({"train": 1}, mixed=2, domains=("chart", "math"))


# -------------------------------------------------------------------------------------- question-kind options


def test_question_kinds_constant_lists_what_the_askers_produce():
    for domain in DOMAINS:
        seen = {sample(domain, i, size=16, long_answers=bool(i % 2))["question_kind"] for i in range(200)}
        assert seen == set(QUESTION_KINDS[domain]), domain


def test_question_kinds_restrict_questions_deterministically_and_are_checked():
    kinds = {"chart": ["type", "count"], "math": ["polygon_sides"], "document": ["paragraphs"]}
    for domain in ("chart", "math", "document", "table"):
        rows = [sample(domain, i, size=32, question_kinds=kinds) for i in range(12)]
        allowed = kinds.get(domain, QUESTION_KINDS[domain])
        assert {r["question_kind"] for r in rows} <= set(allowed)
        for r in rows:
            check_answer(r)
        again = sample(domain, 5, size=32, question_kinds=kinds)
        assert text_fields(again) == text_fields(rows[5]) and np.array_equal(pixels(again), pixels(rows[5]))
    assert sample("table", 3, size=32, question_kinds=kinds)["answer"] == sample("table", 3, size=32)["answer"]
    mixed = [generate_sample("mixed", sample_rng(0, "mixed", "mixed", i), 32, question_kinds=kinds) for i in range(8)]
    assert all(r["question_kind"] in kinds.get(r["domain"], QUESTION_KINDS[r["domain"]]) for r in mixed)
    with pytest.raises(ValueError, match=r"question_kinds\['chart'\] has unknown kinds \['colour'\]"):
        sample("chart", 0, question_kinds={"chart": ["colour"]})
    with pytest.raises(ValueError, match="unknown domain 'audio'"):
        sample("chart", 0, question_kinds={"audio": ["type"]})
    with pytest.raises(ValueError, match="non-empty list"):
        sample("chart", 0, question_kinds={"chart": "type"})
    with pytest.raises(ValueError, match="only has long-answer kinds; pass long_answers=True"):
        sample("table", 0, question_kinds={"table": ["to_html"]})
    assert sample("table", 0, question_kinds={"table": ["to_html"]}, long_answers=True)["question_kind"] == "to_html"


def test_kind_questions_name_the_image_kind_and_zero_changes_nothing():
    for domain in DOMAINS:
        always = sample(domain, 1, size=32, kind_questions=1.0)
        assert always["question_kind"] == "image_kind" and always["answer"] == IMAGE_KINDS[domain]
        assert always["question"] in KIND_QUESTIONS
        never, plain = sample(domain, 1, size=32, kind_questions=0.0), sample(domain, 1, size=32)
        assert text_fields(never) == text_fields(plain) and np.array_equal(pixels(never), pixels(plain))
    ds = build_dataset({"train": 12, "test": 6}, mixed=0, seed=0, image_size=32, kind_questions=0.5)
    assert 0 < sum(k == "image_kind" for k in ds["train"]["question_kind"]) < len(ds["train"])
    assert "image_kind" not in ds["test"]["question_kind"]  # test questions stay about content


def features(image):
    """Simple statistics: colour means / spreads, saturation, edge energy along x and y, coarse colour histograms."""
    a = np.asarray(image, dtype=np.float32) / 255
    g = a.mean(-1)
    sat = a.max(-1) - a.min(-1)
    hist = [np.histogram(a[..., c], bins=4, range=(0, 1))[0] / g.size for c in range(3)]
    edges = [np.abs(np.diff(g, axis=1)).mean(), np.abs(np.diff(g, axis=0)).mean()]
    return np.concatenate([a.mean((0, 1)), a.std((0, 1)), [sat.mean(), sat.std(), *edges], *hist])


def test_a_linear_probe_on_image_statistics_separates_domains_but_no_pixel_does():
    def table(split, n):
        x, y, images = [], [], []
        for i in range(n):
            for k, d in enumerate(DOMAINS):
                image = generate_sample(d, sample_rng(0, split, d, i), 64)["image"]
                x.append(features(image))
                y.append(k)
                images.append(np.asarray(image))
        return np.array(x), np.array(y), np.stack(images)

    x_train, y_train, images = table("train", 40)
    x_test, y_test, _ = table("test", 20)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    design = lambda x: np.c_[(x - mu) / sd, np.ones(len(x))]  # noqa: E731
    a = design(x_train)
    w = np.linalg.solve(a.T @ a + 0.1 * np.eye(a.shape[1]), a.T @ np.eye(len(DOMAINS))[y_train])
    accuracy = ((design(x_test) @ w).argmax(1) == y_test).mean()
    assert accuracy >= 0.85, accuracy
    # no watermark: within every domain, every pixel (and channel) varies from image to image
    for k, d in enumerate(DOMAINS):
        stack = images[y_train == k]
        assert (stack.max(0) != stack.min(0)).all(), d


def test_drawn_shapes_are_where_the_metadata_says():
    for i in range(10):
        s = sample("general", i, size=128)
        image = pixels(s).astype(int)
        for shape in json.loads(s["data"])["shapes"]:
            x, y = int(shape["x"] * 128), int(shape["y"] * 128)
            assert np.abs(image[y, x] - np.array(shape["rgb"])).max() <= 12, (i, shape)


# ------------------------------------------------------------------------------------------------------ answers


@pytest.mark.parametrize("domain", ALL)
def test_answers_match_the_source_data(domain):
    kinds = set()
    for i in range(60):
        s = sample(domain, i, long_answers=True)
        check_answer(s)
        kinds.add(s["question_kind"])
        assert s["domain"] in DOMAINS and (s["secondary_domain"] in DOMAINS) == (domain == "mixed")
        assert s["secondary_domain"] != s["domain"]
        if domain != "mixed" and s["question_kind"] not in ("to_table", "to_html"):
            assert len(s["answer"].split()) <= 3
    expected = {
        "chart": {"value", "max", "min", "count", "type", "to_table"},
        "table": {"cell", "rows", "cols", "to_html"},  # "top_row" (rarer): test_some_tables_span_columns...
        "math": {"triangle_angle", "polygon_sides", "segment_total", "slope_sign", "intercept",
                 "parabola_direction"},
        "document": {"title", "title_words", "paragraphs"},
        "ocr": {"transcribe"},
        "general": {"count_all", "count_shape", "count_color_shape", "color"},
    }.get(domain, set())
    assert expected <= kinds, expected - kinds


def test_vocabularies_are_small():
    answers = {d: {sample(d, i)["answer"] for i in range(100)} for d in DOMAINS}
    assert answers["chart"] <= set(CATEGORIES) | set(CHART_TYPES) | {str(v) for v in range(1, 10)}
    assert answers["general"] <= set(COLORS) | {str(v) for v in range(7)}
    assert answers["ocr"] <= set(WORDS) | {str(v) for v in range(21)}
    assert answers["table"] <= set(WORDS) | {str(v) for v in range(21)}
    assert {w for a in answers["document"] for w in a.split()} <= set(WORDS) | {"1", "2", "3"}
    tokens = {w for v in answers.values() for a in v for w in a.split()}
    assert len(tokens) < 90, sorted(tokens)


def test_some_tables_span_columns_and_math_has_both_question_types():
    tables = [sample("table", i) for i in range(100)]
    assert any("colspan" in s["html"] for s in tables) and any("colspan" not in s["html"] for s in tables)
    top = [s for s in tables if s["question_kind"] == "top_row"]
    assert top and all(check_answer(s) is None and "colspan" in s["html"] for s in top)
    assert all(s["html"] for s in tables) and all(sample(d, 0)["html"] == "" for d in DOMAINS if d != "table")
    math = [sample("math", i) for i in range(60)]
    assert {s["question_type"] for s in math} == {"multi_choice", "free_form"}
    assert {s["answer_type"] for s in math} == {"integer", "float", "text"}


# ------------------------------------------------------------------------------------------------------- schema


def test_one_schema_across_domains_and_json_metadata():
    samples = [sample(d, i) for d in ALL for i in range(3)]
    keys = set(samples[0])
    assert keys == set(FEATURES) - {"id", "messages"}
    for s in samples:
        assert set(s) == keys
        json.dumps(text_fields(s))
        assert isinstance(json.loads(s["data"]), dict)
        assert all(isinstance(s[k], str) for k in ("question", "answer", "domain", "secondary_domain", "html"))


def test_build_dataset_splits_sizes_schema_and_messages():
    data = build_dataset({"train": 3, "validation": 2, "test": 1}, mixed=5, seed=0, image_size=32)
    assert list(data) == ["train", "validation", "test", "mixed"]
    assert {k: len(v) for k, v in data.items()} == {"train": 18, "validation": 12, "test": 6, "mixed": 5}
    for split in data.values():
        assert split.features == FEATURES
    train = data["train"]
    assert train["domain"][:6] == list(DOMAINS)  # interleaved: any prefix is balanced
    assert all(train["domain"].count(d) == 3 for d in DOMAINS) and set(train["secondary_domain"]) == {""}
    assert len(set(train["id"]) | set(data["test"]["id"]) | set(data["mixed"]["id"])) == 18 + 6 + 5
    assert all(r["secondary_domain"] and r["secondary_domain"] != r["domain"] for r in data["mixed"])
    row = train[0]
    assert row["image"].size == (32, 32)
    assert row["messages"] == [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": row["question"]}]},
        {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]},
    ] == to_messages(row)
    empty = build_dataset({"train": 1}, mixed=0)
    assert len(empty["test"]) == 0 and empty["test"].features == FEATURES


def test_save_and_load_round_trip(tmp_path):
    data = build_dataset({"train": 1, "validation": 1}, mixed=2, seed=3)
    save_dataset(data, tmp_path / "synthetic")
    loaded = load_dataset(tmp_path / "synthetic")
    assert list(loaded) == list(data)
    for name in data:
        assert loaded[name].features == FEATURES and len(loaded[name]) == len(data[name])
        for a, b in zip(data[name], loaded[name]):
            assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
            assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}


# --------------------------------------------------------------------------------------------------- preference


def test_preference_pairs_reject_a_plausible_wrong_answer():
    rows = build_dataset({"train": 10}, mixed=6, seed=1, long_answers=True)
    split = rows["train"]
    pairs = make_preference_pairs(split, seed=0)
    assert len(pairs) == len(split) and set(pairs.column_names) == {"images", "prompt", "chosen", "rejected",
                                                                    "domain"}
    for row, pair in zip(split, pairs):
        chosen, rejected = pair["chosen"][0]["content"][0]["text"], pair["rejected"][0]["content"][0]["text"]
        assert chosen == row["answer"] and rejected != chosen
        assert pair["chosen"][0]["role"] == pair["rejected"][0]["role"] == "assistant"
        assert [i["type"] for i in pair["prompt"][0]["content"]] == ["image", "text"]
        assert pair["prompt"][0]["content"][1]["text"] == row["question"]
        assert len(pair["images"]) == 1 and pair["images"][0].size == row["image"].size
        assert re.fullmatch(r"-?[\d.]+", chosen) is None or re.fullmatch(r"-?[\d.]+", rejected), (chosen, rejected)
        if row["choices"]:
            assert rejected in row["choices"]
        if row["question_kind"] == "color":
            assert rejected in COLORS
        if row["question_kind"] in ("max", "min"):
            assert rejected in CATEGORIES
    again = make_preference_pairs(split, seed=0)
    assert again["rejected"] == pairs["rejected"]
    assert make_preference_pairs(rows["mixed"], seed=0)["domain"] == rows["mixed"]["domain"]
