"""Chimera stage-1 domain-general alignment tasks from structured sources (Chimera §3.4, stage 1).

Chimera's first stage aligns each expert's features with the LLM on tasks whose answer is what the image holds:
table format conversion, chart structure extraction, math diagram description, paragraph / document OCR and
captioning. `build_alignment_tasks` turns structured source rows into such instruction -> answer rows, in either
format `chimera_mixpert.data.loading` reads, with `domain` and `task` set.

Source schema, one JSON object per line (`.jsonl`) or a JSON array (`.json`); `image` is a path relative to the source
file's folder (or absolute); every kind may set `domain` to override its default domain (one of
`evaluation.metrics.DOMAINS`; another name is refused with the file, row and the list):

* `table`: `table` (rows of cells, strings or numbers, every row the same length) and optional `title` (a top row
  spanning all columns) -> the table as Markdown (the title on its own line above) or as HTML (the title as a
  `colspan` row), the format chosen per row; default domain `table`.
* `chart`: `x` (category labels), `series` (`{name: [numbers, one per label]}`), optional `title`, `chart_type`,
  `x_name` -> `Title:` / `Type:` lines, then a Markdown table (an `x_name` column, one column per series); `chart`.
* `math`: `description` -> the description; `math`.
* `document`: `text` (the page's text, paragraphs separated by blank lines) -> the text; `document`.
* `ocr`: `text` (the words in the image) -> the text; `ocr`.
* `caption`: `caption` -> the caption; `general`.

The question of each row is one of a few phrasings (and a table's target format one of `table_formats`), chosen from
`(seed, kind, index)` alone: the same sources and seed give the same file. `parse_markdown_table`,
`parse_html_table` and `parse_chart_answer` read answers back (round trips are tested).

`sources_from_synthetic` derives these sources from the mini-lab's rows (`chimera_mixpert.data.synthetic`), whose
`data` field keeps each image's table, chart values, text and figure parameters.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence

from evaluation.metrics import DOMAINS

KINDS = ("table", "chart", "math", "document", "ocr", "caption")
DEFAULT_DOMAIN = {"table": "table", "chart": "chart", "math": "math", "document": "document", "ocr": "ocr",
                  "caption": "general"}
TABLE_FORMATS = ("markdown", "html")
FORMATS = ("messages", "conversations")

PROMPTS = {
    "table": {
        "markdown": ("Convert the table in the image to Markdown.", "Write this table in Markdown format.",
                     "Transcribe the table as a Markdown table."),
        "html": ("Convert the table in the image to HTML.", "Write this table as HTML.",
                 "Transcribe the table into an HTML <table>."),
    },
    "chart": ("Extract the data of the chart as a table.", "Convert the chart into its underlying data table.",
              "What are the title, type and data of this chart? Answer with a table."),
    "math": ("Describe the diagram in detail.", "Describe the figure and give every value marked on it.",
             "What does this math diagram show?"),
    "document": ("Read all the text in the document.", "Transcribe the text of this page.",
                 "What does the document say? Give its full text."),
    "ocr": ("What is written in the image?", "Read the text in the image.", "Transcribe the text shown."),
    "caption": ("Describe the image briefly.", "Write a short caption for the image.", "What does the image show?"),
}


def _pick(seed: int, kind: str, index: int, what: str, options: Sequence):
    """`options[k]` with `k` from a hash of `(seed, kind, index, what)`: order-independent, platform-independent."""
    return options[zlib.crc32(f"{int(seed)}:{kind}:{int(index)}:{what}".encode()) % len(options)]


# ------------------------------------------------------------------------------------------- rendering and parsing


def _cell(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Sequence], title: str = "") -> str:
    """Rows (the first is the header) as a Markdown table; `title` on its own line above, then a blank line."""
    cells = [[_md_escape(_cell(v)) for v in row] for row in rows]
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join(" --- " for _ in cells[0]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells[1:]]
    return (f"{_md_escape(title)}\n\n" if title else "") + "\n".join(lines)


def _split_md_row(line: str) -> list[str]:
    body = line.strip()
    if not (body.startswith("|") and body.endswith("|")):
        raise ValueError(f"Not a Markdown table row: {line!r}")
    cells, current, i, body = [], "", 0, body[1:-1]
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            current += body[i + 1]
            i += 2
            continue
        if body[i] == "|":
            cells.append(current.strip())
            current = ""
        else:
            current += body[i]
        i += 1
    return cells + [current.strip()]


def parse_markdown_table(text: str) -> tuple[str, list[list[str]]]:
    """`markdown_table`'s output -> `(title, rows)` (cells as strings; the separator line dropped)."""
    lines = text.strip().split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if start is None:
        raise ValueError("No Markdown table found.")
    title = re.sub(r"\\(.)", r"\1", " ".join(line.strip() for line in lines[:start] if line.strip()))
    rows = [_split_md_row(line) for line in lines[start:] if line.strip()]
    if len(rows) >= 2 and all(set(c) <= set("-: ") and c for c in rows[1]):
        rows.pop(1)
    return title, rows


def html_table(rows: Sequence[Sequence], title: str = "") -> str:
    """Rows as `<table><tr><td>..</td></tr>..</table>`; `title` as a first row spanning all columns (`colspan`), the
    layout of the mini-lab's tables (and of TEDS-scored table answers)."""
    cols = len(rows[0])
    head = f'<tr><td colspan="{cols}">{html.escape(title)}</td></tr>' if title else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


_TR = re.compile(r"<tr>(.*?)</tr>", re.S)
_TD = re.compile(r"<td(?:\s+colspan=\"(\d+)\")?>(.*?)</td>", re.S)


def parse_html_table(text: str) -> tuple[str, list[list[str]]]:
    """`html_table`'s output -> `(title, rows)`: a first row of one cell spanning every column is the title."""
    rows = [[(span, html.unescape(v)) for span, v in _TD.findall(tr)] for tr in _TR.findall(text)]
    if not rows:
        raise ValueError("No HTML table rows found.")
    title = ""
    if len(rows[0]) == 1 and rows[0][0][0] and len(rows) > 1:
        title = rows.pop(0)[0][1]
    return title, [[v for _, v in row] for row in rows]


def chart_answer(source: Mapping) -> str:
    """A chart source (`x`, `series`, optional `title`, `chart_type`, `x_name`) as its structure-extraction answer."""
    head = [f"Title: {source['title']}"] if source.get("title") else []
    head += [f"Type: {source['chart_type']}"] if source.get("chart_type") else []
    names = list(source["series"])
    rows = [[source.get("x_name") or "category", *names]]
    rows += [[x, *(source["series"][n][i] for n in names)] for i, x in enumerate(source["x"])]
    return "\n".join(head) + ("\n\n" if head else "") + markdown_table(rows)


def parse_chart_answer(text: str) -> dict:
    """`chart_answer`'s output -> `{"title", "chart_type", "x_name", "x", "series"}` (values as strings)."""
    meta = {"title": "", "chart_type": ""}
    lines = text.strip().split("\n")
    for line in lines:
        if line.startswith("Title: "):
            meta["title"] = line[len("Title: "):]
        elif line.startswith("Type: "):
            meta["chart_type"] = line[len("Type: "):]
    _, rows = parse_markdown_table("\n".join(line for line in lines if line.startswith("|")))
    header, body = rows[0], rows[1:]
    series = {name: [row[j + 1] for row in body] for j, name in enumerate(header[1:])}
    return {**meta, "x_name": header[0], "x": [row[0] for row in body], "series": series}


# ---------------------------------------------------------------------------------------------- source validation


def _field(row: Mapping, name: str, kinds: type | tuple, where: str, what: str):
    if name not in row or row[name] is None:
        raise ValueError(f"{where}: missing field {name!r} ({what}).")
    value = row[name]
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise ValueError(f"{where}: field {name!r} must be {what}, got {type(value).__name__} {value!r}.")
    return value


def _text_field(row, name, where, what="a non-empty string"):
    value = _field(row, name, str, where, what)
    if not value.strip():
        raise ValueError(f"{where}: field {name!r} is empty; it must be {what}.")
    return value


def _check_table(row: Mapping, where: str) -> None:
    table = _field(row, "table", list, where, "a list of rows, each a list of cells")
    if not table:
        raise ValueError(f"{where}: field 'table' has no rows.")
    for r, cells in enumerate(table):
        if not isinstance(cells, list) or not cells:
            raise ValueError(f"{where}: field 'table' row {r} must be a non-empty list of cells, got {cells!r}.")
        if len(cells) != len(table[0]):
            raise ValueError(f"{where}: field 'table' row {r} has {len(cells)} cells, row 0 has {len(table[0])}; "
                             "every row needs the same number of cells (put a spanning top row in 'title').")
        for c, v in enumerate(cells):
            if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                raise ValueError(f"{where}: field 'table' row {r} cell {c} must be a string or number, got "
                                 f"{type(v).__name__} {v!r}.")
    if row.get("title") is not None:
        _field(row, "title", str, where, "a string")


def _check_chart(row: Mapping, where: str) -> None:
    x = _field(row, "x", list, where, "a list of category labels")
    series = _field(row, "series", dict, where, "a mapping {series name: [numbers, one per x label]}")
    if not x or not series:
        raise ValueError(f"{where}: fields 'x' and 'series' must be non-empty.")
    for label in x:
        if not isinstance(label, (str, int, float)) or isinstance(label, bool):
            raise ValueError(f"{where}: field 'x' holds {label!r}; labels are strings or numbers.")
    for name, values in series.items():
        if not isinstance(values, list) or len(values) != len(x):
            raise ValueError(f"{where}: field 'series' entry {name!r} must be a list of {len(x)} numbers (one per "
                             f"x label), got {values!r}.")
        for v in values:
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ValueError(f"{where}: field 'series' entry {name!r} holds {v!r}; values are numbers.")
    for name in ("title", "chart_type", "x_name"):
        if row.get(name) is not None:
            _field(row, name, str, where, "a string")


_TEXT_FIELD = {"math": "description", "document": "text", "ocr": "text", "caption": "caption"}


def _check_source_row(kind: str, row, where: str) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a source row is a JSON object, got {type(row).__name__}.")
    _text_field(row, "image", where, "the image path (relative to the source file's folder)")
    if kind == "table":
        _check_table(row, where)
    elif kind == "chart":
        _check_chart(row, where)
    else:
        _text_field(row, _TEXT_FIELD[kind], where)
    if row.get("domain") is not None:
        domain = _text_field(row, "domain", where, "a domain name")
        if domain not in DOMAINS:
            raise ValueError(f"{where}: field 'domain' is {domain!r}, not one of the project's domains {list(DOMAINS)} "
                             "(`evaluation.metrics.DOMAINS`); fix it, or drop it to use the kind's default domain.")


def _answer(kind: str, row: Mapping, table_format: str) -> str:
    if kind == "table":
        render = markdown_table if table_format == "markdown" else html_table
        return render(row["table"], row.get("title") or "")
    if kind == "chart":
        return chart_answer(row)
    return row[_TEXT_FIELD[kind]]


# -------------------------------------------------------------------------------------------------------- building


def read_source_rows(path: str) -> list:
    """The rows of a source file: JSON lines (`.jsonl`) or a JSON array (`.json`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Source file not found: {path}")
    with open(path, encoding="utf-8") as f:
        if path.lower().endswith(".json"):
            rows = json.load(f)
            if not isinstance(rows, list):
                raise ValueError(f"{path}: a .json source holds an array of rows, got {type(rows).__name__}.")
            return rows
        if not path.lower().endswith(".jsonl"):
            raise ValueError(f"{path}: source files are .jsonl or .json.")
        rows = []
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {line_no}: not valid JSON ({e.msg}).") from e
        return rows


def _place_image(image: str, source_dir: str, output_dir: str, kind: str, index: int, mode: str, where: str) -> str:
    path = image if os.path.isabs(image) else os.path.join(source_dir, image)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: field 'image': file not found: {os.path.abspath(path)}")
    relative = os.path.join("images", kind, f"{index:07d}-{os.path.basename(path)}")
    target = os.path.join(output_dir, relative)
    if os.path.lexists(target):
        os.remove(target)
    if mode == "copy":
        shutil.copyfile(path, target)
    else:
        # A symlink inside the output folder: `loading` accepts it (its root check is lexical) and it costs no disk.
        # Relative (real paths on both ends), so the output folder and the sources may move together, e.g. a `data/`
        # folder copied to another machine; moving one without the other breaks the links (then use "copy").
        link_dir = os.path.dirname(os.path.realpath(target))
        os.symlink(os.path.relpath(os.path.realpath(path), link_dir), target)
    return relative.replace(os.sep, "/")


OUTPUTS = ("counts.json", "images")  # besides `<name>.jsonl`: what `build_alignment_tasks` writes


def previous_outputs(output_dir: str, name: str = "alignment", extra: Sequence[str] = ()) -> list[str]:
    """The outputs of an earlier run (`<name>.jsonl`, `counts.json`, `images/`, and `extra`) present in `output_dir`."""
    return [p for p in (f"{name}.jsonl", *OUTPUTS, *extra) if os.path.lexists(os.path.join(output_dir, p))]


def clear_previous_outputs(output_dir: str, name: str = "alignment", overwrite: bool = False,
                           keep: Sequence[str] = (), extra: Sequence[str] = ()) -> None:
    """Refuse an `output_dir` holding an earlier run's outputs (see `previous_outputs`) unless `overwrite`; then delete
    them (the whole `images/` folder: an earlier, larger run's images would otherwise stay). Files in `keep` (the
    sources and their images) must not lie in `images/`."""
    found = previous_outputs(output_dir, name, extra)
    if found and not overwrite:
        raise FileExistsError(f"{output_dir} already holds the outputs of an earlier run ({', '.join(found)}): "
                              "pass --overwrite_output_dir (overwrite=True) to replace them, or choose another "
                              "--output_dir.")
    images = os.path.join(output_dir, "images")
    for path in keep:
        for resolve in (os.path.abspath, os.path.realpath):  # the path as named, and the file it leads to
            if os.path.commonpath([resolve(path), resolve(images)]) == resolve(images):
                raise ValueError(f"{path} lies in {resolve(images)}, which this run writes (and "
                                 "--overwrite_output_dir clears); move the sources out of it or choose another "
                                 "--output_dir.")
    for item in found:
        target = os.path.join(output_dir, item)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        else:
            os.remove(target)


def _record(question: str, answer: str, image: str, domain: str, kind: str, fmt: str) -> dict:
    if fmt == "messages":
        return {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                             {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                "images": [image], "domain": domain, "task": kind}
    return {"conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
            "image": image, "domain": domain, "task": kind}


def _check_build_args(sources, fmt, images, table_formats):
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}.")
    if images not in ("link", "copy"):
        raise ValueError(f"images must be 'link' or 'copy', got {images!r}.")
    if not table_formats or set(table_formats) - set(TABLE_FORMATS):
        raise ValueError(f"table_formats must be a non-empty subset of {TABLE_FORMATS}, got {table_formats!r}.")
    if not sources:
        raise ValueError(f"No sources given; pass KIND=FILE pairs with KIND in {KINDS}.")
    for kind, _ in sources:
        if kind not in KINDS:
            raise ValueError(f"Unknown source kind {kind!r}; kinds are {KINDS}.")


def build_alignment_tasks(sources: Sequence[tuple[str, str]], output_dir: str, fmt: str = "messages",
                          seed: int = 0, images: str = "link", table_formats: Sequence[str] = TABLE_FORMATS,
                          name: str = "alignment", overwrite: bool = False) -> dict:
    """Build `output_dir/<name>.jsonl` (and `counts.json`) from `(kind, source file)` pairs (see the module docstring).

    Args:
        sources: `(kind, path)` pairs, in order (a kind may repeat); rows keep that order.
        output_dir: the output folder; images go to `images/<kind>/` inside it so the file loads with its folder as
            the image root.
        fmt (`str`, defaults to "messages"): "messages" (TRL) or "conversations" (LLaVA).
        seed (`int`, defaults to 0): picks each row's phrasing (and a table's target format).
        images (`str`, defaults to "link"): "link" (relative symlinks: move the output folder together with the
            sources) or "copy" (a self-contained folder).
        table_formats: the target formats tables are converted to (one per row, chosen by `seed`).
        name (`str`, defaults to "alignment"): the output file's stem.
        overwrite (`bool`, defaults to False): replace the outputs of an earlier run in `output_dir` (`<name>.jsonl`,
            `counts.json` and the whole `images/` folder); without it such an `output_dir` is refused.

    Every source row is checked first (missing field, wrong type, unknown domain, missing image -> an error naming
    the file, row and field), so a bad source writes nothing.

    Returns:
        The counts: `total`, `tasks` (rows per kind), `domains` (rows per domain), `output` (the file's path).
    """
    _check_build_args(sources, fmt, images, table_formats)
    loaded, keep = [], []
    for kind, path in sources:
        for i, row in enumerate(read_source_rows(str(path))):
            where = f"{path}, row {i}"
            _check_source_row(kind, row, where)
            image = row["image"]
            full = image if os.path.isabs(image) else os.path.join(os.path.dirname(str(path)), image)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"{where}: field 'image': file not found: {os.path.abspath(full)}")
            loaded.append((kind, str(path), where, row))
            keep += [os.path.abspath(str(path)), os.path.abspath(full)]
    clear_previous_outputs(output_dir, name, overwrite, keep)
    for kind in set(k for k, _ in sources):
        os.makedirs(os.path.join(output_dir, "images", kind), exist_ok=True)
    out_path = os.path.join(output_dir, f"{name}.jsonl")
    counters = {kind: 0 for kind in KINDS}
    tasks, domains = Counter(), Counter()
    with open(out_path, "w", encoding="utf-8") as f:
        for kind, path, where, row in loaded:
            index = counters[kind]
            counters[kind] += 1
            table_format = _pick(seed, kind, index, "format", tuple(table_formats))
            prompts = PROMPTS[kind][table_format] if kind == "table" else PROMPTS[kind]
            question = _pick(seed, kind, index, "prompt", prompts)
            image = _place_image(row["image"], os.path.dirname(path), output_dir, kind, index, images, where)
            domain = row.get("domain") or DEFAULT_DOMAIN[kind]
            f.write(json.dumps(_record(question, _answer(kind, row, table_format), image, domain, kind, fmt),
                               ensure_ascii=False) + "\n")
            tasks[kind] += 1
            domains[domain] += 1
    counts = {"output": out_path, "format": fmt, "seed": seed, "total": sum(tasks.values()),
              "tasks": dict(sorted(tasks.items())), "domains": dict(sorted(domains.items()))}
    with open(os.path.join(output_dir, "counts.json"), "w", encoding="utf-8") as f:
        json.dump(counts, f, indent=2)
        f.write("\n")
    return counts


# ---------------------------------------------------------------------------------------- the mini-lab's sources


def describe_math(data: Mapping) -> str:
    """A description of a mini-lab math figure from its parameters (`synthetic`'s `data` of a math row)."""
    figure = data["figure"]
    if figure == "triangle":
        a, b, x = data["angles"]
        return f"A triangle with two marked angles of {a} and {b} degrees; the third angle, x, is {x} degrees."
    if figure == "polygon":
        return f"A polygon with {data['sides']} sides."
    if figure == "segment":
        p, q = data["parts"]
        return f"A segment AB with a point C on it: AC = {p}, CB = {q}, so AB = {p + q}."
    if figure == "line":
        return (f"A straight line on a grid with slope {data['slope']:.1f} and y-intercept {data['intercept']}: "
                f"y = {data['slope']:.1f}x + {data['intercept']}.")
    if figure == "parabola":
        direction = "upward" if data["a"] > 0 else "downward"
        return f"A parabola opening {direction} with its vertex at ({data['vertex'][0]}, {data['vertex'][1]})."
    raise ValueError(f"Unknown math figure {figure!r}.")


def caption_shapes(data: Mapping) -> str:
    """A caption of a mini-lab general scene: the count of each (colour, shape), sorted, and the background."""
    counts = Counter((s["color"], s["shape"]) for s in data["shapes"])
    parts = [f"{n} {color} {shape}{'s' if n > 1 else ''}" for (color, shape), n in sorted(counts.items())]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    background = {"plain": "plain", "gradient": "gradient", "noise": "noisy"}[data["background"]]
    return f"{listed} on a {background} background."


def document_text(data: Mapping) -> str:
    """A mini-lab page's text: the title, then each paragraph's lines joined by spaces; blank lines between."""
    return "\n\n".join([data["title"], *(" ".join(lines) for lines in data["paragraphs"])])


def _lab_source(domain: str, data: Mapping) -> tuple[str, dict]:
    if domain == "table":
        return "table", {"table": data["cells"], **({"title": data["span_title"]} if data["span_title"] else {})}
    if domain == "chart":
        return "chart", {"x": data["categories"], "series": {"value": data["values"]},
                         "chart_type": data["chart_type"]}
    if domain == "math":
        return "math", {"description": describe_math(data)}
    if domain == "document":
        return "document", {"text": document_text(data)}
    if domain == "ocr":
        return "ocr", {"text": data["text"]}
    return "caption", {"caption": caption_shapes(data)}


def sources_from_synthetic(rows, output_dir: str) -> dict[str, str]:
    """Write the alignment sources of mini-lab rows (`synthetic.build_dataset` rows, or `generate_sample` dicts with
    an `id`): each image as `output_dir/images/<id>.png` and one `<kind>.jsonl` per kind present. Rows of the mixed
    split are skipped (their image shows two domains; `data` describes one). Returns `{kind: path}`."""
    os.makedirs(os.path.join(output_dir, "images"), exist_ok=True)
    by_kind: dict[str, list[dict]] = {}
    for i, row in enumerate(rows):
        if row.get("secondary_domain"):
            continue
        kind, source = _lab_source(row["domain"], json.loads(row["data"]))
        image = f"images/{row.get('id') or f'row-{i}'}.png"
        row["image"].save(os.path.join(output_dir, image))
        by_kind.setdefault(kind, []).append({"image": image, **source})
    paths = {}
    for kind in KINDS:
        if kind in by_kind:
            paths[kind] = os.path.join(output_dir, f"{kind}.jsonl")
            with open(paths[kind], "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in by_kind[kind])
    return paths
