"""Split a training mixture into per-domain files by each row's source (dataset) name.

Mixpert tunes one vision expert per domain on that domain's data only (Mixpert §3.2, the data split of its Table 1);
the mixtures it starts from (LLaVA-OneVision's single-image data) name each row's source dataset, not its domain.
`split_by_domain` maps source names to domains with a mapping file and writes one file per domain, rows unchanged
(relative image paths rebased, below) plus a `domain` field (what `chimera_mixpert.data.loading`, `train.mixpert`
and `train.chimera` read).

Mapping file (YAML): domain -> list of source names or glob patterns (`fnmatch` rules, case-sensitive; a name
without `*`, `?` or `[` must match exactly):

    chart: ["chartqa(cauldron,llava_format)", "dvqa*"]
    math: [mavis_math_metagen, mavis_math_rule_geo]

Input: `.jsonl`, `.json` (an array of rows, or JSON lines) or `.parquet`, rows in either format `loading` accepts
(`messages` or `conversations`); each row names its source in `source_field`. Output: `<domain>.jsonl` for JSON
inputs, `<domain>.parquet` for parquet inputs (parquet rows may carry image bytes, which JSON cannot), plus
`counts.json`. A row whose source matches no pattern raises (or, with `unmatched="general"` / `"drop"`, goes to
`general` / is dropped and counted); a source matching patterns of two domains always raises (fix the mapping).

Rows are written unchanged except for relative image paths (`images` / `image`: a path, a `{"path": ...}` dict, or a
list of them, in either row format): they are rewritten to start from the output folder (`os.path.relpath`), so every
output file loads with the training scripts' default image root (the file's folder) whatever folders the inputs came
from; two inputs in different folders with same-named images stay apart. Absolute paths are kept. Images outside the
output folder give `../` paths, which the loader accepts with `--allow_images_outside_root true` (its guard against
data files reading arbitrary files); moving the output folder alone breaks them, moving it with the images does not.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
from collections import Counter
from pathlib import Path

import yaml

from evaluation.metrics import DOMAINS

UNMATCHED_POLICIES = ("error", "general", "drop")
_GLOB_CHARS = set("*?[")


def load_domain_mapping(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read and check a mapping file: `{domain: [source name or glob, ...]}` in file order.

    Raises `ValueError` naming the file for: not a mapping, an unknown domain (not in `evaluation.metrics.DOMAINS`;
    the closest name is suggested), a non-list or empty list, a non-string pattern, or one pattern under two domains.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Domain mapping file not found: {path}")
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: a domain mapping is a YAML mapping `domain: [source names or globs]`, got "
                         f"{type(raw).__name__}.")
    mapping, owner = {}, {}
    for domain, patterns in raw.items():
        if domain not in DOMAINS:
            close = difflib.get_close_matches(str(domain), DOMAINS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{path}: unknown domain {domain!r}{hint}; domains are {list(DOMAINS)}.")
        if not isinstance(patterns, list) or not patterns:
            raise ValueError(f"{path}: domain {domain!r} needs a non-empty list of source names or globs, got "
                             f"{patterns!r}.")
        for pattern in patterns:
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"{path}: domain {domain!r} has a pattern {pattern!r}; patterns are non-empty "
                                 "strings (quote names that YAML would read otherwise).")
            if pattern in owner:
                raise ValueError(f"{path}: source {pattern!r} is listed under both {owner[pattern]!r} and "
                                 f"{domain!r}; keep it under one domain.")
            owner[pattern] = domain
        mapping[domain] = list(patterns)
    return mapping


def _matches(pattern: str, source: str) -> bool:
    if _GLOB_CHARS & set(pattern):
        return fnmatch.fnmatchcase(source, pattern)
    return pattern == source


def match_domains(source: str, mapping: dict[str, list[str]]) -> list[tuple[str, str]]:
    """Every `(domain, pattern)` of `mapping` that matches `source` (empty: unmatched; two domains: ambiguous)."""
    return [(domain, p) for domain, patterns in mapping.items() for p in patterns if _matches(p, source)]


# ----------------------------------------------------------------------------------------------------- reading rows


def _read_json_rows(path: str) -> list[dict]:
    """A `.json` array of rows, or JSON lines (`.jsonl`, or a `.json` file holding JSON lines, as `datasets` reads;
    a `.json` file holding a single object is one JSON-lines row)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.lower().endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # JSON lines in a .json file
        if isinstance(data, list):
            rows = data
        elif isinstance(data, dict):
            rows = [data]  # one JSON-lines row (`datasets` reads it so too)
        elif data is not None:
            raise ValueError(f"{path}: a .json data file holds an array of rows (or JSON lines), got "
                             f"{type(data).__name__}.")
        else:
            rows = None
        if rows is not None:
            for i, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise ValueError(f"{path}, row {i}: a row is a JSON object, got {type(row).__name__}.")
            return rows
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {line_no}: not valid JSON ({e.msg}).") from e
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {line_no}: a row is a JSON object, got {type(row).__name__}.")
        rows.append(row)
    return rows


def _check_row_format(row: dict, where: str) -> None:
    if not isinstance(row.get("messages"), list) and not isinstance(row.get("conversations"), list):
        raise ValueError(f"{where}: a row needs `messages` (HF format) or `conversations` (LLaVA format); this is "
                         "not a training mixture row.")


def _source_of(value, where: str, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: no source name in field {field!r} (got {value!r}); pass --source_field with the "
                         "field that names each row's dataset, or add it to the rows.")
    return value


# ----------------------------------------------------------------------------------------------------- image paths

IMAGE_FIELDS = ("images", "image")  # `loading` reads either field in either row format


def rebase_image(value, input_dir: str, output_dir: str):
    """An image reference (a path, a dict with `path`, or a list of them) with each relative path, which starts from
    `input_dir`, rewritten to start from `output_dir` (POSIX separators); absolute paths and anything else unchanged."""
    if isinstance(value, list):
        return [rebase_image(v, input_dir, output_dir) for v in value]
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        return {**value, "path": rebase_image(value["path"], input_dir, output_dir)}
    if isinstance(value, str) and value and not os.path.isabs(value):
        # Lexical, as `loading.resolve_image_path` resolves it: `output_dir/<result>` names the same file.
        return os.path.relpath(os.path.join(input_dir, value), output_dir).replace(os.sep, "/")
    return value


def _rebased_row(row: dict, input_dir: str, output_dir: str) -> dict:
    return {k: rebase_image(v, input_dir, output_dir) if k in IMAGE_FIELDS else v for k, v in row.items()}


# -------------------------------------------------------------------------------------------------------- assigning


def _assign(sources: list[tuple[str, str]], mapping: dict, unmatched: str) -> list[str | None]:
    """The domain of each `(where, source)`; `None` = dropped. Raises on the first ambiguous or (policy "error")
    unmatched source, naming every other unmatched source too so one run shows the whole fix."""
    domains, missing = [], {}
    for where, source in sources:
        hits = match_domains(source, mapping)
        hit_domains = sorted({d for d, _ in hits})
        if len(hit_domains) > 1:
            raise ValueError(f"{where}: source {source!r} matches patterns of several domains "
                             f"({', '.join(f'{d}: {p!r}' for d, p in hits)}); make the mapping's patterns disjoint "
                             "(--unmatched does not apply to ambiguous sources).")
        if hit_domains:
            domains.append(hit_domains[0])
            continue
        missing.setdefault(source, where)
        domains.append({"general": "general", "drop": None}.get(unmatched, "?"))
    if missing and unmatched == "error":
        source, where = next(iter(missing.items()))
        others = sorted(set(missing) - {source})
        also = f" Other unmatched sources: {others}." if others else ""
        raise ValueError(f"{where}: source {source!r} matches no entry of the domain mapping. Add it (or a glob) "
                         "under one domain in the mapping file, or pass --unmatched general (send unmatched rows to "
                         f"the general domain) or --unmatched drop (drop them, counted in counts.json).{also}")
    return domains


def _check_existing_domain(existing, assigned: str | None, where: str) -> None:
    if assigned is not None and existing not in (None, "", assigned):
        raise ValueError(f"{where}: the row already has domain {existing!r} but its source maps to {assigned!r}; "
                         "remove the row's `domain` field or change the mapping.")


def _counts(kept: list[tuple[str, str | None]], domains: list[str], unmatched: str, files: list[str],
            source_field: str) -> dict:
    per_domain = Counter(d for _, d in kept if d is not None)
    per_source: dict[str, Counter] = {}
    for source, d in kept:
        per_source.setdefault(d if d is not None else "dropped", Counter())[source] += 1
    return {
        "inputs": files,
        "source_field": source_field,
        "unmatched": unmatched,
        "total": len(kept),
        "domains": {d: per_domain.get(d, 0) for d in domains},
        "dropped": sum(1 for _, d in kept if d is None),
        "sources": {k: dict(sorted(v.items())) for k, v in sorted(per_source.items())},
    }


def _output_domains(mapping: dict, unmatched: str) -> list[str]:
    domains = list(mapping)
    if unmatched == "general" and "general" not in domains:
        domains.append("general")
    return domains


def _input_kind(files: list[str]) -> str:
    kinds = set()
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"Input file not found: {f}")
        suffix = Path(f).suffix.lower()
        if suffix not in (".jsonl", ".json", ".parquet"):
            raise ValueError(f"{f}: input files are .jsonl, .json or .parquet, got {suffix!r}.")
        kinds.add("parquet" if suffix == ".parquet" else "json")
    if len(kinds) != 1:
        raise ValueError(f"Inputs must all be JSON (.jsonl/.json) or all parquet, got {files}.")
    return kinds.pop()


def _split_json(files, mapping, output_dir, source_field, unmatched, domains) -> list[tuple[str, str | None]]:
    rows, sources = [], []
    for f in files:
        input_dir = os.path.dirname(os.path.abspath(f))
        for i, row in enumerate(_read_json_rows(f)):
            where = f"{f}, row {i}"
            _check_row_format(row, where)
            sources.append((where, _source_of(row.get(source_field), where, source_field)))
            rows.append(_rebased_row(row, input_dir, os.path.abspath(output_dir)))
    assigned = _assign(sources, mapping, unmatched)
    for row, (where, _), domain in zip(rows, sources, assigned):
        _check_existing_domain(row.get("domain"), domain, where)
    handles = {d: open(os.path.join(output_dir, f"{d}.jsonl"), "w", encoding="utf-8") for d in domains}
    try:
        for row, domain in zip(rows, assigned):
            if domain is not None:
                handles[domain].write(json.dumps({**row, "domain": domain}, ensure_ascii=False) + "\n")
    finally:
        for handle in handles.values():
            handle.close()
    return [(s, d) for (_, s), d in zip(sources, assigned)]


def _rebase_parquet_images(table, files, tables, output_dir):
    """`table` with the relative paths of its `images` / `image` columns rebased (see `rebase_image`); same types."""
    import pyarrow as pa  # noqa: PLC0415 (parquet inputs only)

    row_dirs = [os.path.dirname(os.path.abspath(f)) for f, t in zip(files, tables) for _ in range(t.num_rows)]
    for name in IMAGE_FIELDS:
        if name in table.column_names:
            column = table.column(name)
            values = [rebase_image(v, d, os.path.abspath(output_dir)) for v, d in zip(column.to_pylist(), row_dirs)]
            table = table.set_column(table.column_names.index(name), name, pa.array(values, type=column.type))
    return table


def _split_parquet(files, mapping, output_dir, source_field, unmatched, domains) -> list[tuple[str, str | None]]:
    # pyarrow directly (not `datasets`): the rows' columns, image bytes included, pass through unchanged.
    import pyarrow as pa  # noqa: PLC0415 (parquet inputs only)
    import pyarrow.parquet as pq  # noqa: PLC0415 (parquet inputs only)

    tables = [pq.read_table(f) for f in files]
    schemas = {t.schema.remove_metadata() for t in tables}
    if len(schemas) > 1:
        raise ValueError(f"Parquet inputs {files} have different columns; split them one file at a time.")
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    table = _rebase_parquet_images(table, files, tables, output_dir)
    names = table.column_names
    where0 = files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more)"
    if "messages" not in names and "conversations" not in names:
        raise ValueError(f"{where0}: no `messages` or `conversations` column; this is not a training mixture.")
    if source_field not in names:
        raise ValueError(f"{where0}: no column {source_field!r} naming each row's source; pass --source_field with "
                         f"one of {names}.")
    wheres = [f"{f}, row {i}" for f, t in zip(files, tables) for i in range(t.num_rows)]
    sources = [(w, _source_of(s, w, source_field)) for w, s in zip(wheres, table.column(source_field).to_pylist())]
    assigned = _assign(sources, mapping, unmatched)
    existing = table.column("domain").to_pylist() if "domain" in names else [None] * table.num_rows
    for value, (where, _), domain in zip(existing, sources, assigned):
        _check_existing_domain(value, domain, where)
    if "domain" in names:
        table = table.drop_columns(["domain"])
    table = table.append_column("domain", pa.array([d or "" for d in assigned], pa.string()))
    for d in domains:
        indices = [i for i, a in enumerate(assigned) if a == d]
        pq.write_table(table.take(pa.array(indices, pa.int64())), os.path.join(output_dir, f"{d}.parquet"))
    return [(s, d) for (_, s), d in zip(sources, assigned)]


def split_by_domain(input_files: str | list[str], mapping: dict[str, list[str]] | str | os.PathLike,
                    output_dir: str | os.PathLike, source_field: str = "source", unmatched: str = "error") -> dict:
    """Split `input_files` into one file per domain in `output_dir` (see the module docstring).

    Args:
        input_files: one path or a list (all JSON, or all parquet); rows keep their order.
        mapping: a mapping (`load_domain_mapping`'s result) or the path of a mapping file.
        output_dir: created if needed; `<domain>.jsonl` / `<domain>.parquet` for every mapped domain (empty ones too,
            so a rerun leaves no stale file of a previous run) and `counts.json`.
        source_field (`str`, defaults to "source"): the row field naming its source dataset.
        unmatched (`str`, defaults to "error"): "error", "general" or "drop" (see the module docstring).

    Returns:
        The counts (also written to `counts.json`): `total`, `domains` (rows per domain), `dropped`, and `sources`
        (per domain, rows per source name; dropped rows under "dropped").
    """
    if unmatched not in UNMATCHED_POLICIES:
        raise ValueError(f"unmatched must be one of {UNMATCHED_POLICIES}, got {unmatched!r}.")
    if not isinstance(mapping, dict):
        mapping = load_domain_mapping(mapping)
    files = [str(input_files)] if isinstance(input_files, (str, os.PathLike)) else [str(f) for f in input_files]
    if not files:
        raise ValueError("No input files given.")
    kind = _input_kind(files)
    output_dir = str(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    domains = _output_domains(mapping, unmatched)
    split = _split_parquet if kind == "parquet" else _split_json
    kept = split(files, mapping, output_dir, source_field, unmatched, domains)
    counts = _counts(kept, domains, unmatched, files, source_field)
    with open(os.path.join(output_dir, "counts.json"), "w", encoding="utf-8") as f:
        json.dump(counts, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return counts


def format_counts(counts: dict) -> str:
    """`split_by_domain`'s counts as a plain-text table (domain, rows, share, sources)."""
    total = counts["total"]
    lines = [f"{'domain':<10} {'rows':>9} {'share':>7}  sources"]
    for domain, n in counts["domains"].items():
        share = f"{100.0 * n / total:.1f}%" if total else "-"
        lines.append(f"{domain:<10} {n:>9} {share:>7}  {len(counts['sources'].get(domain, {}))}")
    if counts["dropped"]:
        lines.append(f"{'dropped':<10} {counts['dropped']:>9}  sources: {sorted(counts['sources']['dropped'])}")
    lines.append(f"{'total':<10} {total:>9}")
    return "\n".join(lines)
