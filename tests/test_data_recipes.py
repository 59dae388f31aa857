"""Data recipes: the per-domain split of a mixture (`train.data.split_domains`, Mixpert's data split) and Chimera's
stage-1 alignment tasks (`train.data.alignment_tasks`), checked on hand-written mixtures and on the mini-lab's data."""

import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from chimera_mixpert.data import alignment
from chimera_mixpert.data.domains import load_domain_mapping, match_domains, split_by_domain
from chimera_mixpert.data.loading import load_vl_dataset
from evaluation.metrics import DOMAINS
from train.data import alignment_tasks, split_domains

ROOT = Path(__file__).resolve().parent.parent
MAPPING = {"chart": ["chartqa", "dvqa*"], "math": ["geo3k", "mavis_*"], "ocr": ["textcaps"],
           "general": ["sharegpt4o"]}


def _messages_row(source, i):
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": f"q{i}"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": f"a{i}"}]}],
            "source": source, "id": i}


def _llava_row(source, i):
    return {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}],
            "source": source, "id": i}


# Both row formats in one file; 3 chart (one by glob), 3 math (two by glob), 1 ocr, 2 general.
SOURCES = ["chartqa", "dvqa_train", "geo3k", "mavis_math_metagen", "textcaps", "sharegpt4o", "chartqa",
           "mavis_math_rule_geo", "sharegpt4o"]
EXPECTED = {"chart": [0, 1, 6], "math": [2, 3, 7], "ocr": [4], "general": [5, 8]}


def _mixture():
    return [(_messages_row if i % 2 else _llava_row)(s, i) for i, s in enumerate(SOURCES)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _write_mapping(path, mapping=MAPPING):
    path.write_text(yaml.safe_dump(mapping))
    return str(path)


def _read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _split(tmp_path, rows, *extra, name="out", mapping=MAPPING):
    data = _write_jsonl(tmp_path / f"{name}-in.jsonl", rows)
    args = ["--mapping", _write_mapping(tmp_path / f"{name}-map.yaml", mapping), "--input", data,
            "--output_dir", str(tmp_path / name), *extra]
    return split_domains.main(split_domains.make_parser().parse_args(args))


def test_split_domains_exact_counts_rows_unchanged_in_both_formats_and_loadable(tmp_path, capsys):
    rows = _mixture()
    counts = _split(tmp_path, rows)
    assert counts["domains"] == {"chart": 3, "math": 3, "ocr": 1, "general": 2}
    assert counts["total"] == 9 and counts["dropped"] == 0
    assert counts["sources"]["chart"] == {"chartqa": 2, "dvqa_train": 1}
    assert counts["sources"]["math"] == {"geo3k": 1, "mavis_math_metagen": 1, "mavis_math_rule_geo": 1}
    assert json.loads((tmp_path / "out" / "counts.json").read_text()) == counts
    for domain, ids in EXPECTED.items():
        written = _read_jsonl(tmp_path / "out" / f"{domain}.jsonl")
        assert written == [{**rows[i], "domain": domain} for i in ids]  # unchanged, in order, plus `domain`
        loaded = load_vl_dataset(str(tmp_path / "out" / f"{domain}.jsonl"), domains=list(DOMAINS))
        assert loaded["domain"] == [domain] * len(ids)
        assert [m[1]["content"][0]["text"] for m in loaded["messages"]] == [f"a{i}" for i in ids]
    printed = capsys.readouterr().out
    assert "chart" in printed and "33.3%" in printed and "total" in printed


def test_split_domains_is_deterministic(tmp_path):
    _split(tmp_path, _mixture(), name="a")
    _split(tmp_path, _mixture(), name="b")
    for name in ("chart", "math", "ocr", "general"):
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (tmp_path / "b" / f"{name}.jsonl").read_bytes()
    counts_a = json.loads((tmp_path / "a" / "counts.json").read_text())
    counts_b = json.loads((tmp_path / "b" / "counts.json").read_text())
    assert {k: v for k, v in counts_a.items() if k != "inputs"} == {k: v for k, v in counts_b.items() if k != "inputs"}


def test_split_domains_unmatched_source_errors_by_default_then_general_or_drop(tmp_path):
    rows = _mixture() + [_llava_row("okvqa", 9), _messages_row("vqav2", 10)]
    with pytest.raises(ValueError, match=r"out-in\.jsonl, row 9: source 'okvqa' matches no entry.*--unmatched "
                                         r"general.*Other unmatched sources: \['vqav2'\]"):
        _split(tmp_path, rows)
    counts = _split(tmp_path, rows, "--unmatched", "general", name="gen")
    assert counts["domains"] == {"chart": 3, "math": 3, "ocr": 1, "general": 4}
    assert [r["id"] for r in _read_jsonl(tmp_path / "gen" / "general.jsonl")] == [5, 8, 9, 10]
    counts = _split(tmp_path, rows, "--unmatched", "drop", name="drop")
    assert counts["domains"]["general"] == 2 and counts["dropped"] == 2 and counts["total"] == 11
    assert counts["sources"]["dropped"] == {"okvqa": 1, "vqav2": 1}


def test_split_domains_ambiguous_source_always_errors(tmp_path):
    mapping = {**MAPPING, "document": ["chart*"]}  # "chartqa" now matches chart and document
    for policy in ("error", "general", "drop"):
        with pytest.raises(ValueError, match=r"row 0: source 'chartqa' matches patterns of several domains "
                                             r"\(chart: 'chartqa', document: 'chart\*'\)"):
            _split(tmp_path, _mixture(), "--unmatched", policy, mapping=mapping)


def test_split_domains_bad_rows_and_mappings_raise_with_the_fix(tmp_path):
    rows = _mixture()
    del rows[3]["source"]
    with pytest.raises(ValueError, match=r"row 3: no source name in field 'source'.*--source_field"):
        _split(tmp_path, rows)
    renamed = [{**{k: v for k, v in r.items() if k != "source"}, "data_source": r["source"]} for r in _mixture()]
    assert _split(tmp_path, renamed, "--source_field", "data_source", name="ds")["domains"]["chart"] == 3
    with pytest.raises(ValueError, match=r"row 2: the row already has domain 'chart' but its source maps to 'math'"):
        _split(tmp_path, [r if i != 2 else {**r, "domain": "chart"} for i, r in enumerate(_mixture())])
    with pytest.raises(ValueError, match=r"row 0: a row needs `messages`.*or `conversations`"):
        _split(tmp_path, [{"source": "chartqa", "text": "hi"}])
    with pytest.raises(ValueError, match=r"unknown domain 'charts' \(did you mean 'chart'\?\)"):
        load_domain_mapping(_write_mapping(tmp_path / "bad.yaml", {"charts": ["chartqa"]}))
    with pytest.raises(ValueError, match=r"source 'chartqa' is listed under both 'chart' and 'document'"):
        load_domain_mapping(_write_mapping(tmp_path / "dup.yaml", {"chart": ["chartqa"], "document": ["chartqa"]}))


def test_split_domains_reads_json_arrays_and_parquet_with_image_bytes(tmp_path):
    rows = _mixture()
    (tmp_path / "mix.json").write_text(json.dumps(rows))
    counts = split_by_domain(str(tmp_path / "mix.json"), MAPPING, tmp_path / "json")
    assert counts["domains"] == {"chart": 3, "math": 3, "ocr": 1, "general": 2}
    assert [r["id"] for r in _read_jsonl(tmp_path / "json" / "math.jsonl")] == EXPECTED["math"]
    # LLaVA-OneVision's parquet layout: conversations, an image struct with bytes, and the source name.
    table = pa.table({
        "id": [str(i) for i in range(len(SOURCES))],
        "image": [{"bytes": bytes([i, 255 - i]), "path": None} for i in range(len(SOURCES))],
        "conversations": [r["conversations"] if "conversations" in r else _llava_row(s, i)["conversations"]
                          for i, (r, s) in enumerate(zip(rows, SOURCES))],
        "data_source": SOURCES,
    })
    pq.write_table(table, tmp_path / "mix.parquet")
    counts = split_by_domain(str(tmp_path / "mix.parquet"), MAPPING, tmp_path / "pq", source_field="data_source")
    assert counts["domains"] == {"chart": 3, "math": 3, "ocr": 1, "general": 2}
    for domain, ids in EXPECTED.items():
        out = pq.read_table(tmp_path / "pq" / f"{domain}.parquet").to_pylist()
        assert [r["id"] for r in out] == [str(i) for i in ids]
        assert [r["image"]["bytes"] for r in out] == [bytes([i, 255 - i]) for i in ids]
        assert {r["domain"] for r in out} == {domain}


def _two_folders_with_same_named_images(tmp_path):
    """x/ and y/ each hold `img.png` (different bytes) and a file whose chart rows refer to it: HF format in x/ (an
    `images` list), LLaVA format in y/ (an `image` string, a list with a sub-folder path); plus one absolute path."""
    files = {}
    for folder in ("x", "y"):
        (tmp_path / folder / "sub").mkdir(parents=True)
        (tmp_path / folder / "img.png").write_bytes(folder.encode())
        (tmp_path / folder / "sub" / "img.png").write_bytes(f"{folder}/sub".encode())
    absolute = str(tmp_path / "y" / "img.png")
    x_rows = [{**_messages_row("chartqa", 0), "images": ["img.png"]},
              {**_messages_row("chartqa", 1), "images": [{"path": absolute, "bytes": None}]}]
    y_rows = [{**_llava_row("chartqa", 2), "image": "img.png"},
              {**_llava_row("dvqa", 3), "image": ["sub/img.png"]}]
    files["x"] = _write_jsonl(tmp_path / "x" / "a.jsonl", x_rows)
    files["y"] = _write_jsonl(tmp_path / "y" / "b.jsonl", y_rows)
    return files, x_rows + y_rows, [tmp_path / "x" / "img.png", tmp_path / "y" / "img.png", tmp_path / "y" / "img.png",
                                    tmp_path / "y" / "sub" / "img.png"]


def test_split_domains_rebases_image_paths_of_inputs_in_different_folders(tmp_path):
    files, rows, originals = _two_folders_with_same_named_images(tmp_path)
    out = tmp_path / "split" / "domains"
    args = ["--mapping", _write_mapping(tmp_path / "map.yaml"), "--input", files["x"], files["y"],
            "--output_dir", str(out)]
    split_domains.main(split_domains.make_parser().parse_args(args))
    written = _read_jsonl(out / "chart.jsonl")
    assert [r["images"] if "images" in r else r["image"] for r in written] == [
        ["../../x/img.png"], [{"path": str(tmp_path / "y" / "img.png"), "bytes": None}], "../../y/img.png",
        ["../../y/sub/img.png"]]  # relative to the output folder; the absolute path kept
    strip = ("images", "image", "domain")
    assert [{k: v for k, v in r.items() if k not in strip} for r in written] == [
        {k: v for k, v in r.items() if k not in strip} for r in rows]  # otherwise unchanged
    # The default image root (the output file's folder); the images lie outside it, hence allow_outside_root.
    loaded = load_vl_dataset(str(out / "chart.jsonl"), allow_outside_root=True)
    assert [Path(p[0]) for p in loaded["images"]] == originals
    assert [Path(p[0]).read_bytes() for p in loaded["images"]] == [b"x", b"y", b"y", b"y/sub"]
    with pytest.raises(ValueError, match=r"image path '\.\./\.\./x/img\.png' leaves the image root"):
        load_vl_dataset(str(out / "chart.jsonl"))  # the loader's guard still applies
    # An output folder above the inputs: the paths stay inside it and load with no flag at all.
    split_by_domain([files["x"], files["y"]], MAPPING, tmp_path)
    assert [r.get("images", r.get("image")) for r in _read_jsonl(tmp_path / "chart.jsonl")][::2] == [
        ["x/img.png"], "y/img.png"]
    assert [Path(p[0]) for p in load_vl_dataset(str(tmp_path / "chart.jsonl"))["images"]] == originals


def test_split_domains_rebases_parquet_image_paths_and_reads_a_one_row_json(tmp_path):
    files, _, originals = _two_folders_with_same_named_images(tmp_path)
    for folder, name in (("x", "img.png"), ("y", "sub/img.png")):
        pq.write_table(pa.table({"conversations": [_llava_row("chartqa", 0)["conversations"]], "image": [name],
                                 "source": ["chartqa"]}), tmp_path / folder / "c.parquet")
    split_by_domain([str(tmp_path / "x" / "c.parquet"), str(tmp_path / "y" / "c.parquet")], MAPPING, tmp_path / "pq")
    table = pq.read_table(tmp_path / "pq" / "chart.parquet")
    assert table.column("image").to_pylist() == ["../x/img.png", "../y/sub/img.png"]
    loaded = load_vl_dataset(str(tmp_path / "pq" / "chart.parquet"), allow_outside_root=True)
    assert [Path(p[0]) for p in loaded["images"]] == [originals[0], originals[3]]
    # A .json file holding one JSON-lines row (one object) is that one row.
    (tmp_path / "one.json").write_text(json.dumps(_llava_row("geo3k", 7)) + "\n")
    counts = split_by_domain(str(tmp_path / "one.json"), MAPPING, tmp_path / "one")
    assert counts["domains"] == {"chart": 0, "math": 1, "ocr": 0, "general": 0}
    assert _read_jsonl(tmp_path / "one" / "math.jsonl") == [{**_llava_row("geo3k", 7), "domain": "math"}]
    (tmp_path / "scalar.json").write_text("3")
    with pytest.raises(ValueError, match=r"scalar\.json: a \.json data file holds an array of rows.*got int"):
        split_by_domain(str(tmp_path / "scalar.json"), MAPPING, tmp_path / "scalar")


def test_shipped_llava_onevision_mapping_uses_mixperts_domains_and_is_disjoint():
    path = ROOT / "train" / "configs" / "data" / "mixpert_llava_ov_domains.yaml"
    mapping = load_domain_mapping(path)
    assert list(mapping) == ["chart", "document", "math", "ocr", "general"]  # train.assemble mixpert's domains
    names = [name for patterns in mapping.values() for name in patterns]
    assert len(names) == len(set(names))
    assert all(len({d for d, _ in match_domains(name, mapping)}) == 1 for name in names)
    text = path.read_text()
    assert "Table 1" in text and "could not be read" in text  # the header says what the assignment rests on


# --------------------------------------------------------------------------------------------- alignment tasks


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A small mini-lab set (4 rows per domain, 2 mixed rows) and its derived sources."""
    from chimera_mixpert.data.synthetic import build_dataset, save_dataset

    folder = tmp_path_factory.mktemp("lab")
    dataset = build_dataset({"train": 4}, mixed=2, image_size=32)
    save_dataset(dataset, folder / "data")
    rows = list(dataset["train"]) + list(dataset["mixed"])
    sources = alignment.sources_from_synthetic(rows, str(folder / "sources"))
    return {"folder": folder, "rows": dataset["train"], "sources": sources}


def _answers_of(path, fmt):
    rows = _read_jsonl(path)
    if fmt == "messages":
        return [r["messages"][1]["content"][0]["text"] for r in rows]
    return [r["conversations"][1]["value"] for r in rows]


def _assert_answer_is_the_lab_data(row, task, answer):
    data = json.loads(row["data"])
    if task == "table":
        if answer.startswith("<table>"):
            assert answer == row["html"]  # the HTML answer is the lab's own HTML, to the character
            title, cells = alignment.parse_html_table(answer)
        else:
            title, cells = alignment.parse_markdown_table(answer)
        assert (title, cells) == (data["span_title"], data["cells"])
    elif task == "chart":
        parsed = alignment.parse_chart_answer(answer)
        assert parsed["x"] == data["categories"] and parsed["chart_type"] == data["chart_type"]
        assert parsed["series"] == {"value": [str(v) for v in data["values"]]}
    elif task == "document":
        assert answer.split("\n\n") == [data["title"], *(" ".join(lines) for lines in data["paragraphs"])]
    elif task == "ocr":
        assert answer == data["text"] == row["answer"]
    elif task == "math":
        assert answer == alignment.describe_math(data)
        numbers = {"triangle": data.get("angles"), "polygon": [data.get("sides")], "segment": data.get("parts"),
                   "line": [data.get("intercept")], "parabola": data.get("vertex")}[data["figure"]]
        assert all(str(n) in answer for n in numbers)
    else:
        listed = Counter((s["color"], s["shape"]) for s in data["shapes"])
        for (color, shape), n in listed.items():
            assert f"{n} {color} {shape}{'s' if n > 1 else ''}" in answer


@pytest.mark.parametrize("fmt", ["messages", "conversations"])
def test_alignment_tasks_on_the_lab_round_trip_to_its_data_and_load(lab, tmp_path, fmt):
    args = ["--output_dir", str(tmp_path / "out"), "--format", fmt, "--images", "copy"]
    for kind, path in lab["sources"].items():
        args += ["--source", f"{kind}={path}"]
    counts = alignment_tasks.main(alignment_tasks.make_parser().parse_args(args))
    assert counts["tasks"] == {kind: 4 for kind in sorted(alignment.KINDS)}  # mixed rows skipped
    assert counts["domains"] == {domain: 4 for domain in sorted(DOMAINS)}
    rows = _read_jsonl(counts["output"])
    assert all(("messages" in r) == (fmt == "messages") for r in rows)
    by_domain = {}
    for row in lab["rows"]:
        by_domain.setdefault(row["domain"], []).append(row)
    lab_order = [row for kind in lab["sources"] for row in by_domain[alignment.DEFAULT_DOMAIN[kind]]]
    formats = set()
    for row, written, answer in zip(lab_order, rows, _answers_of(counts["output"], fmt), strict=True):
        assert written["domain"] == row["domain"]
        _assert_answer_is_the_lab_data(row, written["task"], answer)
        if written["task"] == "table":
            formats.add("html" if answer.startswith("<table>") else "markdown")
    assert formats == {"html", "markdown"}  # seed 0 picks both target formats among the 4 tables
    loaded = load_vl_dataset(counts["output"], domains=list(DOMAINS))
    assert len(loaded) == 24 and loaded["domain"] == [r["domain"] for r in rows]
    assert [m[1]["content"][0]["text"] for m in loaded["messages"]] == _answers_of(counts["output"], fmt)
    assert all(Path(p[0]).is_file() and not Path(p[0]).is_symlink() for p in loaded["images"])


def test_alignment_tasks_are_deterministic_and_the_seed_picks_the_phrasing(lab, tmp_path):
    sources = list(lab["sources"].items())
    first = alignment.build_alignment_tasks(sources, str(tmp_path / "a"), seed=3)
    again = alignment.build_alignment_tasks(sources, str(tmp_path / "b"), seed=3)
    other = alignment.build_alignment_tasks(sources, str(tmp_path / "c"), seed=4)
    assert Path(first["output"]).read_bytes() == Path(again["output"]).read_bytes()
    questions = [[r["messages"][0]["content"][1]["text"] for r in _read_jsonl(c["output"])] for c in (first, other)]
    assert questions[0] != questions[1]
    assert all(Path(tmp_path / "a" / r["images"][0]).is_symlink() for r in _read_jsonl(first["output"]))


def test_alignment_tasks_from_a_saved_lab_dataset(lab, tmp_path):
    args = ["--from_synthetic", str(lab["folder"] / "data"), "--output_dir", str(tmp_path / "out")]
    counts = alignment_tasks.main(alignment_tasks.make_parser().parse_args(args))
    assert counts["total"] == 24 and (tmp_path / "out" / "sources" / "table.jsonl").is_file()


def test_alignment_sources_with_bad_rows_raise_naming_file_row_and_field(tmp_path):
    (tmp_path / "a.png").write_bytes(b"png")
    bad = {
        "table": ({"image": "a.png"}, r"tables\.jsonl, row 1: missing field 'table'"),
        "chart": ({"image": "a.png", "x": ["A", "B"], "series": {"v": [1, "2"]}},
                  r"charts\.jsonl, row 1: field 'series' entry 'v' holds '2'; values are numbers"),
        "document": ({"image": "a.png", "text": 3}, r"documents\.jsonl, row 1: field 'text' must be"),
        "caption": ({"image": "missing.png", "caption": "x"},
                    r"captions\.jsonl, row 1: field 'image': file not found: .*missing\.png"),
    }
    good = {"table": {"image": "a.png", "table": [["a", 1]]},
            "chart": {"image": "a.png", "x": ["A"], "series": {"v": [1]}},
            "document": {"image": "a.png", "text": "hello"}, "caption": {"image": "a.png", "caption": "x"}}
    for kind, (row, message) in bad.items():
        path = _write_jsonl(tmp_path / f"{kind}s.jsonl", [good[kind], row])
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            alignment.build_alignment_tasks([(kind, path)], str(tmp_path / "out"))
        assert not (tmp_path / "out" / "alignment.jsonl").exists()  # checked before anything is written
    ragged = _write_jsonl(tmp_path / "ragged.jsonl", [{"image": "a.png", "table": [["a", "b"], ["c"]]}])
    with pytest.raises(ValueError, match=r"ragged\.jsonl, row 0: field 'table' row 1 has 1 cells, row 0 has 2"):
        alignment.build_alignment_tasks([("table", ragged)], str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"Unknown source kind 'diagram'"):
        alignment.build_alignment_tasks([("diagram", ragged)], str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"--source must look like KIND=FILE"):
        alignment_tasks.main(alignment_tasks.make_parser().parse_args(["--source", "tables.jsonl",
                                                                       "--output_dir", str(tmp_path)]))


def _ocr_sources(folder, n):
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / "img" / f"w{i}.png").write_bytes(f"word{i}".encode())
    return _write_jsonl(folder / "ocr.jsonl", [{"image": f"img/w{i}.png", "text": f"word{i}"} for i in range(n)])


def test_alignment_tasks_link_images_relatively_so_the_folders_move_together(tmp_path):
    sources = _ocr_sources(tmp_path / "data" / "src", 2)
    counts = alignment.build_alignment_tasks([("ocr", sources)], str(tmp_path / "data" / "out"))
    links = sorted((tmp_path / "data" / "out" / "images" / "ocr").iterdir())
    assert [link.name for link in links] == ["0000000-w0.png", "0000001-w1.png"]
    assert [Path(os.readlink(link)).as_posix() for link in links] == [f"../../../src/img/w{i}.png" for i in (0, 1)]
    assert counts["output"] == str(tmp_path / "data" / "out" / "alignment.jsonl")
    (tmp_path / "data").rename(tmp_path / "moved")  # e.g. copied to another machine under another path
    loaded = load_vl_dataset(str(tmp_path / "moved" / "out" / "alignment.jsonl"))
    assert [Path(p[0]).read_bytes() for p in loaded["images"]] == [b"word0", b"word1"]
    assert [m[1]["content"][0]["text"] for m in loaded["messages"]] == ["word0", "word1"]


def test_alignment_tasks_refuse_an_unknown_domain_and_an_earlier_run_unless_overwriting(tmp_path):
    sources = _ocr_sources(tmp_path / "src", 3)
    typo = _write_jsonl(tmp_path / "typo.jsonl", [{"image": "src/img/w0.png", "text": "a"},
                                                  {"image": "src/img/w1.png", "text": "b", "domain": "charts"}])
    with pytest.raises(ValueError, match=r"typo\.jsonl, row 1: field 'domain' is 'charts', not one of the project's "
                                         r"domains \['chart', .*'general'\]"):
        alignment.build_alignment_tasks([("ocr", typo)], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    out = tmp_path / "out"
    alignment.build_alignment_tasks([("ocr", sources)], str(out))
    assert len(list((out / "images" / "ocr").iterdir())) == 3
    smaller = _write_jsonl(tmp_path / "one.jsonl", [{"image": "src/img/w2.png", "text": "word2", "domain": "document"}])
    args = ["--source", f"ocr={smaller}", "--output_dir", str(out)]
    with pytest.raises(FileExistsError, match=r"out already holds the outputs of an earlier run \(alignment\.jsonl, "
                                              r"counts\.json, images\): pass --overwrite_output_dir"):
        alignment_tasks.main(alignment_tasks.make_parser().parse_args(args))
    counts = alignment_tasks.main(alignment_tasks.make_parser().parse_args([*args, "--overwrite_output_dir"]))
    assert counts["domains"] == {"document": 1}
    assert [p.name for p in (out / "images" / "ocr").iterdir()] == ["0000000-w2.png"]  # no stale image of run 1
    assert load_vl_dataset(str(out / "alignment.jsonl"), domains=list(DOMAINS))["domain"] == ["document"]
    # Sources whose images lie in the folder --overwrite_output_dir clears are refused, not deleted.
    inside = _write_jsonl(out / "inside.jsonl", [{"image": "images/ocr/0000000-w2.png", "text": "x"}])
    with pytest.raises(ValueError, match=r"0000000-w2\.png lies in .*images, which this run writes"):
        alignment.build_alignment_tasks([("ocr", inside)], str(out), overwrite=True)
    assert (out / "images" / "ocr" / "0000000-w2.png").is_symlink()


def test_alignment_tasks_from_synthetic_refuse_then_replace_an_earlier_run(lab, tmp_path):
    args = ["--from_synthetic", str(lab["folder"] / "data"), "--output_dir", str(tmp_path / "out")]
    alignment_tasks.main(alignment_tasks.make_parser().parse_args(args))
    (tmp_path / "out" / "sources" / "images" / "stale.png").write_bytes(b"old")
    with pytest.raises(FileExistsError, match=r"earlier run \(alignment\.jsonl, counts\.json, images, sources\)"):
        alignment_tasks.main(alignment_tasks.make_parser().parse_args(args))
    counts = alignment_tasks.main(alignment_tasks.make_parser().parse_args([*args, "--overwrite_output_dir"]))
    assert counts["total"] == 24 and not (tmp_path / "out" / "sources" / "images" / "stale.png").exists()


def test_table_and_chart_answers_round_trip_with_escapes_and_numbers():
    rows = [["name", "a|b", "total"], ["x\\y", 2.0, 3.5]]
    title, parsed = alignment.parse_markdown_table(alignment.markdown_table(rows, title="T | 1"))
    assert title == "T | 1" and parsed == [["name", "a|b", "total"], ["x\\y", "2", "3.5"]]
    title, parsed = alignment.parse_html_table(alignment.html_table([["<b>", "&"]], title="Top"))
    assert (title, parsed) == ("Top", [["<b>", "&"]])
    source = {"title": "Sales", "chart_type": "line", "x_name": "year", "x": ["2020", "2021"],
              "series": {"north": [1, 2.5], "south": [3, 4]}}
    assert alignment.parse_chart_answer(alignment.chart_answer(source)) == {
        "title": "Sales", "chart_type": "line", "x_name": "year", "x": ["2020", "2021"],
        "series": {"north": ["1", "2.5"], "south": ["3", "4"]}}
