"""Deterministic synthetic six-domain image-QA data: the data of the "mini-lab" where tiny Chimera / Mixpert models
(hidden size 64-128, 2-4 layers, a few minutes of CPU training) must show that

* a router can tell the domains apart from the image alone (each domain has its own layout, background and colours;
  a linear probe on simple image statistics separates them, but no single pixel gives the domain away: every
  background is jittered per sample and there is no watermark),
* per-domain expert tuning helps each domain (each domain has its own question templates and answer vocabulary),
* ambiguous images exist for routing studies (the `mixed` split puts two domains in one image).

Domains (`DOMAINS`) and what is asked:

* `chart`: bar / line / pie charts drawn with matplotlib (Agg canvas, no GUI, no pyplot) over 3-5 categories `A`-`E`
  with integer values 1-9; values of a category (bar / line), the largest / smallest category, the number of bars /
  points / slices, the chart type. With `long_answers=True` also "Convert the chart to a table." -> "A: 3, B: 7".
* `table`: grids of 2-4 rows and 2-3 columns of numbers 0-20 and / or words, sometimes with a top row spanning all
  columns (`colspan`); a cell ("What is in row 2, column 3?"), the number of rows / columns, the spanning top row.
  `html` holds the structure (`<table><tr><td>..</td></tr></table>`) for TEDS; with `long_answers=True` also
  "Convert the table to HTML." -> the HTML.
* `math`: triangles with two marked angles (the third, `x`), polygons (number of sides), segments with marked parts
  (a length), lines `y = ax + b` (slope sign, slope, intercept) and parabolas (direction, vertex); MathVista-like
  `question_type` ("multi_choice" / "free_form"), `answer_type` ("integer" / "float" / "text"), `choices` and
  `precision` (decimals of float answers).
* `document`: a page with a large bold title (one or two words) and 1-3 paragraphs of body text; the title, the
  number of words in the title, the number of paragraphs.
* `ocr`: one word or number in one of eight DejaVu fonts (shipped with matplotlib), varied size, rotation and colours;
  "What is written in the image?" (three phrasings) -> the string.
* `general`: circles, squares and triangles in eight colours on plain, gradient or noisy backgrounds; counts ("How many
  red circles are there?") and colours ("What color is the square?").

Vocabularies are small so tiny models can learn the answers: numbers 0-20 (plus multiples of 10 up to 140 for
angles, -4..4 and a few halves for function plots), `COLORS` (8), `WORDS` (20), `CATEGORIES` (A-E), `SHAPES` (3),
`CHART_TYPES` (3), and positive / negative, upward / downward.

Every sample is drawn from its own generator, `sample_rng(seed, split, domain, index)`, so a sample does not depend on
which other samples were generated or in which order, and the question / answer of a sample do not depend on the image
size (only the pixels do).

Rows (`generate_sample`, `build_dataset`) share one schema (`FEATURES`) across domains: `id`, `image`, `question`,
`answer`, `domain`, `secondary_domain` ("" outside the mixed split), `question_kind` (e.g. "value", "cell",
"count_color_shape"), `question_type`, `answer_type`, `choices` ([] unless multiple choice), `precision` (None unless
a float answer), `html` ("" outside tables), `data` (the source of truth as a JSON string: chart table, table cells,
drawn shapes, rendered text, figure parameters) and `messages` (the conversation in TRL's chat format, built by
`to_messages`).

Images are RGB PIL images of `image_size` x `image_size` pixels (default 64; 32 and 128 work too). PIL drawings are
rendered at 2-4x and downsampled (anti-aliasing); charts are drawn by matplotlib at the target size on a reused
figure.
"""

from __future__ import annotations

import functools
import json
import math
import os
import zlib
from collections.abc import Mapping, Sequence

import datasets
import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from evaluation.metrics import DOMAINS  # the project's one domain vocabulary

SPLITS = ("train", "validation", "test", "mixed")

WORDS = ("cat", "dog", "sun", "map", "box", "cup", "car", "pen", "key", "hat",
         "tree", "book", "fish", "bird", "star", "moon", "ship", "lamp", "door", "rain")
COLORS = {
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (240, 205, 30),
    "orange": (245, 130, 30), "purple": (140, 60, 190), "pink": (240, 120, 190), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
CHART_TYPES = ("bar", "line", "pie")
CATEGORIES = ("A", "B", "C", "D", "E")

# Mixed layouts: name -> the two domains in the image (the question is about one of them, chosen per sample).
MIXED_LAYOUTS = {
    "chart_in_document": ("chart", "document"),
    "table_beside_plot": ("table", "math"),
    "text_over_scene": ("ocr", "general"),
    "table_in_document": ("table", "document"),
}

_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2, "mixed": 3}
_DOMAIN_IDS = {**{d: i for i, d in enumerate(DOMAINS)}, "mixed": len(DOMAINS)}

_FONT_FILES = {
    "sans": "DejaVuSans.ttf", "sans-bold": "DejaVuSans-Bold.ttf", "sans-oblique": "DejaVuSans-Oblique.ttf",
    "serif": "DejaVuSerif.ttf", "serif-bold": "DejaVuSerif-Bold.ttf", "serif-italic": "DejaVuSerif-Italic.ttf",
    "mono": "DejaVuSansMono.ttf", "mono-bold": "DejaVuSansMono-Bold.ttf",
}
_CHART_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_INK = ((20, 20, 20), (30, 40, 110), (120, 25, 25), (25, 90, 40))

_CONTENT = datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")})
_MESSAGES = datasets.List({"role": datasets.Value("string"), "content": _CONTENT})
FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "image": datasets.Image(),
    "question": datasets.Value("string"),
    "answer": datasets.Value("string"),
    "domain": datasets.Value("string"),
    "secondary_domain": datasets.Value("string"),
    "question_kind": datasets.Value("string"),
    "question_type": datasets.Value("string"),
    "answer_type": datasets.Value("string"),
    "choices": datasets.List(datasets.Value("string")),
    "precision": datasets.Value("int32"),
    "html": datasets.Value("string"),
    "data": datasets.Value("string"),
    "messages": _MESSAGES,
})
PREFERENCE_FEATURES = datasets.Features({
    "images": datasets.List(datasets.Image()),
    "prompt": _MESSAGES,
    "chosen": _MESSAGES,
    "rejected": _MESSAGES,
    "domain": datasets.Value("string"),
})


# --------------------------------------------------------------------------------------------------- small helpers


def sample_rng(seed: int, split: str, domain: str, index: int) -> np.random.Generator:
    """The generator of one sample, seeded from `(seed, split, domain, index)` (order-independent generation).

    Args:
        seed: dataset seed (non-negative int).
        split: "train", "validation", "test", "mixed" or any other name (hashed).
        domain: one of `DOMAINS`, or "mixed".
        index: the sample's index within its split and domain.
    """
    split_id = _SPLIT_IDS.get(split, zlib.crc32(split.encode()) + 16)
    domain_id = _DOMAIN_IDS.get(domain, zlib.crc32(domain.encode()) + 16)
    return np.random.default_rng([int(seed), split_id, domain_id, int(index)])


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _pick_weighted(rng, weights: Mapping[str, float]) -> str:
    keys = list(weights)
    p = np.asarray([weights[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _jitter(rng, rgb, amount: int) -> tuple:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _noise_rng(rng) -> np.random.Generator:
    """A child generator for pixel noise, drawn with one call so the parent's stream does not depend on image size."""
    return np.random.default_rng(int(rng.integers(2**63)))


def _add_noise(image: Image.Image, rng, sigma: float) -> Image.Image:
    arr = np.asarray(image, dtype=np.float32)
    arr = arr + rng.normal(0.0, sigma, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def _gradient(w: int, h: int, top, bottom) -> Image.Image:
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    arr = (1 - t) * np.asarray(top, np.float32) + t * np.asarray(bottom, np.float32)
    return Image.fromarray(np.broadcast_to(np.rint(arr), (h, w, 3)).astype(np.uint8))


def _luminance(rgb) -> float:
    return (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255.0


@functools.lru_cache(maxsize=None)
def _font_path(name: str) -> str:
    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", _FONT_FILES[name])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"matplotlib's bundled font {path} is missing; reinstall matplotlib.")
    return path


@functools.lru_cache(maxsize=512)
def _font(name: str, px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(_font_path(name), size=max(4, int(px)))


class _Canvas:
    """A PIL drawing in output-pixel coordinates, rendered at 2-4x and downsampled by `result()` (anti-aliasing)."""

    def __init__(self, w: int, h: int, background=(255, 255, 255), image: Image.Image | None = None):
        self.w, self.h = w, h
        self.s = min(4, max(2, math.ceil(128 / min(w, h))))
        if image is None:
            self.image = Image.new("RGB", (w * self.s, h * self.s), tuple(background))
        else:
            self.image = image.convert("RGB").resize((w * self.s, h * self.s), Image.Resampling.NEAREST)
        self.draw = ImageDraw.Draw(self.image)

    def _xy(self, points):
        return [(x * self.s, y * self.s) for x, y in points]

    def _px(self, width: float) -> int:
        return max(1, round(width * self.s))

    def line(self, points, fill, width=1.0):
        self.draw.line(self._xy(points), fill=tuple(fill), width=self._px(width), joint="curve")

    def rectangle(self, box, fill=None, outline=None, width=1.0):
        x0, y0, x1, y1 = box
        self.draw.rectangle([x0 * self.s, y0 * self.s, x1 * self.s, y1 * self.s], fill=fill and tuple(fill),
                            outline=outline and tuple(outline), width=self._px(width) if outline else 0)

    def ellipse(self, box, fill=None, outline=None, width=1.0):
        x0, y0, x1, y1 = box
        self.draw.ellipse([x0 * self.s, y0 * self.s, x1 * self.s, y1 * self.s], fill=fill and tuple(fill),
                          outline=outline and tuple(outline), width=self._px(width) if outline else 0)

    def polygon(self, points, fill=None, outline=None, width=1.0):
        self.draw.polygon(self._xy(points), fill=fill and tuple(fill), outline=outline and tuple(outline),
                          width=self._px(width) if outline else 0)

    def font(self, name: str, size: float) -> ImageFont.FreeTypeFont:
        return _font(name, round(size * self.s))

    def text_width(self, text: str, size: float, font: str) -> float:
        return self.font(font, size).getlength(text) / self.s

    def fit(self, text: str, size: float, font: str, max_width: float) -> float:
        """`size`, shrunk so that `text` is at most `max_width` output pixels wide."""
        width = self.text_width(text, size, font)
        return size if width <= max_width else size * max_width / width

    def text(self, xy, text: str, size: float, fill, font="sans-bold", anchor="mm"):
        self.draw.text((xy[0] * self.s, xy[1] * self.s), text, font=self.font(font, size), fill=tuple(fill),
                       anchor=anchor)

    def paste(self, image: Image.Image, box):
        """Paste `image` (any size) resized into `box` (output pixels)."""
        x0, y0, x1, y1 = (round(v * self.s) for v in box)
        self.image.paste(image.convert("RGB").resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS), (x0, y0))

    def result(self) -> Image.Image:
        return self.image.resize((self.w, self.h), Image.Resampling.BOX)


def _text_layer(text: str, font: str, px: int, color, rotation: float) -> Image.Image:
    """`text` as a tight RGBA image (`px`-pixel font), rotated by `rotation` degrees (canvas expanded)."""
    f = _font(font, px)
    x0, y0, x1, y1 = f.getbbox(text)
    pad = max(2, px // 8)
    layer = Image.new("RGBA", (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), (0, 0, 0, 0))
    ImageDraw.Draw(layer).text((pad - x0, pad - y0), text, font=f, fill=tuple(color) + (255,))
    if rotation:
        layer = layer.rotate(rotation, resample=Image.Resampling.BICUBIC, expand=True)
    return layer


def _place_text(canvas: _Canvas, text: str, font: str, color, rotation: float, box, fill: float, offset):
    """Draw `text` rotated, scaled to `fill` of `box` (output pixels) and moved by `offset` (-1..1 of the slack)."""
    x0, y0, x1, y1 = box
    bw, bh = (x1 - x0) * canvas.s, (y1 - y0) * canvas.s
    layer = _text_layer(text, font, max(8, round(bh)), color, rotation)
    scale = min(bw * fill / layer.width, bh * fill / layer.height)
    layer = layer.resize((max(1, round(layer.width * scale)), max(1, round(layer.height * scale))),
                         Image.Resampling.LANCZOS)
    slack_x, slack_y = bw - layer.width, bh - layer.height
    px = round(x0 * canvas.s + slack_x / 2 * (1 + offset[0]))
    py = round(y0 * canvas.s + slack_y / 2 * (1 + offset[1]))
    canvas.image.paste(layer, (px, py), layer)


def _qa(question, answer, kind, question_type="free_form", answer_type="text", choices=(), precision=None) -> dict:
    return {"question": question, "answer": str(answer), "question_kind": kind, "question_type": question_type,
            "answer_type": answer_type, "choices": [str(c) for c in choices], "precision": precision}


def _multi_choice(question: str, choices) -> str:
    letters = "ABCDEFGH"
    return question + "\nChoices: " + " ".join(f"({letters[i]}) {c}" for i, c in enumerate(choices))


def _number_choices(rng, answer: int, pool) -> list[int]:
    """`answer` and three distinct distractors from `pool`, sorted."""
    others = [v for v in pool if v != answer]
    picked = rng.choice(len(others), size=3, replace=False)
    return sorted([answer, *(others[int(i)] for i in picked)])


# ----------------------------------------------------------------------------------------------------------- chart


_MPL_RC = {"font.family": "DejaVu Sans", "font.weight": "normal", "axes.linewidth": 0.8, "xtick.major.size": 0,
           "ytick.major.size": 0, "xtick.minor.size": 0, "ytick.minor.size": 0, "xtick.major.pad": 1.0,
           "ytick.major.pad": 1.0, "lines.antialiased": True, "patch.antialiased": True, "text.antialiased": True,
           "axes.unicode_minus": True, "figure.dpi": 72, "path.simplify": True}


@functools.lru_cache(maxsize=64)
def _chart_template(w: int, h: int, chart_type: str, n: int):
    """A reused matplotlib figure for one (size, chart type, number of categories): Agg canvas (no pyplot, no GUI),
    1 point = 1 pixel (dpi 72). Each chart only updates heights, angles and colours, then draws (creating axes and
    ticks per chart would cost ~5x more)."""
    # matplotlib's figure classes: about 0.5 s (a third of this module's import), paid on the first chart only, so
    # code that uses only this module's other helpers (domains, questions, preference pairs) never pays it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (first chart only)
    from matplotlib.figure import Figure  # noqa: PLC0415 (first chart only)
    from matplotlib.patches import Wedge  # noqa: PLC0415 (first chart only)

    label_size = max(4.0, 0.15 * h)
    with matplotlib.rc_context(_MPL_RC):
        fig = Figure(figsize=(w / 72, h / 72), dpi=72)
        FigureCanvasAgg(fig)
        if chart_type == "pie":
            ax = fig.add_axes((0.04, 0.04, 0.92, 0.92))
            ax.set_xlim(-1.05, 1.05)
            ax.set_ylim(-1.05, 1.05)
            ax.set_aspect("equal")
            ax.axis("off")
            wedges = [ax.add_patch(Wedge((0, 0), 1.0, 0, 90, linewidth=max(0.5, 0.02 * h))) for _ in range(n)]
            labels = [ax.text(0, 0, c, ha="center", va="center", fontsize=label_size, fontweight="bold",
                              color="white") for c in CATEGORIES[:n]]
            return fig, ax, {"wedges": wedges, "labels": labels}
        ax = fig.add_axes((0.2, 0.17, 0.76, 0.79))
        ax.set_ylim(0, 10)
        ax.set_xlim(-0.6, n - 0.4)
        ax.set_yticks([0, 5, 10])
        ax.set_xticks(range(n))
        ax.set_xticklabels(CATEGORIES[:n], fontsize=label_size, fontweight="bold")
        ax.tick_params(axis="y", labelsize=max(4.0, 0.12 * h))
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        grid = ax.hlines(range(1, 11), -0.6, n - 0.4, linewidth=max(0.4, 0.008 * h), zorder=0.5)
        if chart_type == "bar":
            artists = list(ax.bar(range(n), [1] * n, width=0.66, zorder=2))
        else:
            artists = ax.plot(range(n), [1] * n, linewidth=max(1.0, 0.035 * h), marker="o",
                              markersize=max(2.0, 0.09 * h), zorder=2)
        return fig, ax, {"grid": grid, "artists": artists}


def _chart_content(rng) -> dict:
    chart_type = _pick(rng, CHART_TYPES)
    n = int(rng.integers(3, 6))
    while True:
        values = [int(v) for v in rng.integers(1, 10, size=n)]
        if values.count(max(values)) == 1 and values.count(min(values)) == 1:
            break
    single = bool(rng.random() < 0.6) and chart_type != "pie"
    order = rng.permutation(len(_CHART_COLORS))
    colors = [_CHART_COLORS[int(order[0])]] * n if single else [_CHART_COLORS[int(i)] for i in order[:n]]
    background = _jitter(rng, (252, 252, 252), 4)
    axes_bg = background if rng.random() < 0.6 else _jitter(rng, (232, 233, 242), 5)
    grid = _jitter(rng, (185, 185, 185), 20)
    return {"chart_type": chart_type, "categories": list(CATEGORIES[:n]), "values": values, "colors": colors,
            "background": background, "axes_background": axes_bg, "grid": grid}


def _draw_chart(data: dict, w: int, h: int) -> Image.Image:
    rgb = lambda c: tuple(v / 255 for v in c)  # noqa: E731
    values, chart_type = data["values"], data["chart_type"]
    scale = min(4, max(1, math.ceil(128 / min(w, h))))  # like `_Canvas`: draw at >= 128 px, then downsample
    fig, ax, parts = _chart_template(w * scale, h * scale, chart_type, len(values))
    with matplotlib.rc_context(_MPL_RC):
        fig.set_facecolor(rgb(data["background"]))
        if chart_type == "pie":
            start, total = 90.0, sum(values)
            for wedge, label, value, color in zip(parts["wedges"], parts["labels"], values, data["colors"]):
                end = start - 360.0 * value / total  # clockwise from 12 o'clock
                wedge.set_theta1(end)
                wedge.set_theta2(start)
                wedge.set_facecolor(color)
                wedge.set_edgecolor(rgb(data["background"]))
                mid = math.radians((start + end) / 2)
                label.set_position((0.62 * math.cos(mid), 0.62 * math.sin(mid)))
                start = end
        else:
            ax.set_facecolor(rgb(data["axes_background"]))
            parts["grid"].set_color(rgb(data["grid"]))
            if chart_type == "bar":
                for bar, value, color in zip(parts["artists"], values, data["colors"]):
                    bar.set_height(value)
                    bar.set_facecolor(color)
            else:
                line = parts["artists"][0]
                line.set_ydata(values)
                line.set_color(data["colors"][0])
                line.set_markerfacecolor(data["colors"][0])
                line.set_markeredgecolor(data["colors"][0])
        fig.canvas.draw()
        arr = np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy()
    return Image.fromarray(arr).resize((w, h), Image.Resampling.BOX)


def _render_chart(rng, w: int, h: int) -> tuple[Image.Image, dict]:
    data = _chart_content(rng)
    return _draw_chart(data, w, h), data


def chart_table_text(data: Mapping) -> str:
    """A chart's data table as short text: `{"categories": ["A", "B"], "values": [3, 7]}` -> "A: 3, B: 7"."""
    return ", ".join(f"{c}: {v}" for c, v in zip(data["categories"], data["values"]))


def _ask_chart(rng, data: dict, long_answers: bool = False, kinds=None) -> dict:
    kind_weights = {"value": 0.35, "max": 0.18, "min": 0.14, "count": 0.15, "type": 0.18}
    if data["chart_type"] == "pie":
        kind_weights.pop("value")
    if long_answers:
        kind_weights["to_table"] = 0.2
    if kinds is not None:
        kind_weights = {k: v for k, v in kind_weights.items() if k in kinds}
    kind = _pick_weighted(rng, kind_weights)
    cats, values = data["categories"], data["values"]
    if kind == "value":
        i = int(rng.integers(len(cats)))
        return _qa(f"What is the value of {cats[i]}?", values[i], kind, answer_type="integer")
    if kind == "max":
        return _qa("Which category has the highest value?", cats[values.index(max(values))], kind)
    if kind == "min":
        return _qa("Which category has the lowest value?", cats[values.index(min(values))], kind)
    if kind == "count":
        noun = {"bar": "bars", "line": "points", "pie": "slices"}[data["chart_type"]]
        return _qa(f"How many {noun} are in the chart?", len(cats), kind, answer_type="integer")
    if kind == "type":
        return _qa("What type of chart is this?", data["chart_type"], kind)
    return _qa("Convert the chart to a table.", chart_table_text(data), kind)


# ----------------------------------------------------------------------------------------------------------- table


def _table_content(rng, max_cols: int = 3) -> dict:
    cols = int(rng.integers(2, max_cols + 1))
    span = bool(rng.random() < 0.25)
    body_rows = int(rng.integers(1, 4)) if span else int(rng.integers(2, 5))
    cell_kind = _pick(rng, ("numbers", "words", "mixed"))
    cells = []
    for _ in range(body_rows):
        row = []
        for c in range(cols):
            word = cell_kind == "words" or (cell_kind == "mixed" and c == 0)
            row.append(_pick(rng, WORDS) if word else str(int(rng.integers(0, 21))))
        cells.append(row)
    title = _pick(rng, WORDS) if span else ""
    rows_html = "".join("<tr>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>" for row in cells)
    head = f'<tr><td colspan="{cols}">{title}</td></tr>' if span else ""
    style = {
        "background": _jitter(rng, _pick(rng, ((252, 252, 252), (248, 250, 255), (252, 251, 242))), 3),
        "line": _jitter(rng, _pick(rng, ((30, 30, 30), (90, 90, 90), (40, 60, 110))), 15),
        "header": _jitter(rng, _pick(rng, ((205, 220, 245), (225, 225, 225), (250, 235, 190))), 8)
        if rng.random() < 0.6 else None,
        "zebra": bool(rng.random() < 0.35),
        "font": _pick(rng, ("sans", "sans-bold", "mono-bold")),
        "margins": [float(v) for v in rng.uniform(0.03, 0.1, size=4)],
    }
    return {"rows": body_rows + span, "cols": cols, "cells": cells, "span_title": title,
            "html": f"<table>{head}{rows_html}</table>", "style": style}


def _draw_table(data: dict, w: int, h: int) -> Image.Image:
    st = data["style"]
    canvas = _Canvas(w, h, st["background"])
    left, top, right, bottom = st["margins"]
    x0, y0, x1, y1 = left * w, top * h, w - right * w, h - bottom * h
    rows, cols = data["rows"], data["cols"]
    rh, cw = (y1 - y0) / rows, (x1 - x0) / cols
    lines = [[data["span_title"]]] * (1 if data["span_title"] else 0) + data["cells"]
    for r in range(rows):
        shade = st["header"] if (r == 0 and st["header"]) else None
        if shade is None and st["zebra"] and r % 2 == 1:
            shade = tuple(int(v * 0.93) for v in st["background"])
        if shade:
            canvas.rectangle((x0, y0 + r * rh, x1, y0 + (r + 1) * rh), fill=shade)
    size = 0.58 * rh
    for r, row in enumerate(lines):
        width = cw * (cols if len(row) == 1 and cols > 1 else 1)
        for v in row:
            size = min(size, canvas.fit(v, size, st["font"], 0.84 * width))
    line_w = max(0.8, 0.018 * min(w, h))
    for r in range(1, rows):
        canvas.line([(x0, y0 + r * rh), (x1, y0 + r * rh)], st["line"], line_w)
    for r, row in enumerate(lines):
        if len(row) == 1 and cols > 1:  # the spanning row: no inner vertical lines
            canvas.text((x0 + (x1 - x0) / 2, y0 + (r + 0.5) * rh), row[0], size, (20, 20, 20), st["font"])
            continue
        for c in range(1, cols):
            canvas.line([(x0 + c * cw, y0 + r * rh), (x0 + c * cw, y0 + (r + 1) * rh)], st["line"], line_w)
        for c, v in enumerate(row):
            canvas.text((x0 + (c + 0.5) * cw, y0 + (r + 0.5) * rh), v, size, (20, 20, 20), st["font"])
    canvas.rectangle((x0, y0, x1, y1), outline=st["line"], width=1.5 * line_w)
    return canvas.result()


def _render_table(rng, w: int, h: int, max_cols: int = 3) -> tuple[Image.Image, dict]:
    data = _table_content(rng, max_cols=max_cols)
    return _draw_table(data, w, h), data


def _ask_table(rng, data: dict, long_answers: bool = False, kinds=None) -> dict:
    kind_weights = {"cell": 0.55, "rows": 0.17, "cols": 0.17}
    if data["span_title"]:
        kind_weights["top_row"] = 0.2
    if long_answers:
        kind_weights["to_html"] = 0.2
    if kinds is not None:
        kind_weights = {k: v for k, v in kind_weights.items() if k in kinds}
    kind = _pick_weighted(rng, kind_weights)
    if kind == "cell":
        r, c = int(rng.integers(len(data["cells"]))), int(rng.integers(data["cols"]))
        value = data["cells"][r][c]
        row_number = r + 1 + (1 if data["span_title"] else 0)
        return _qa(f"What is in row {row_number}, column {c + 1}?", value, kind,
                   answer_type="integer" if value.isdigit() else "text")
    if kind == "rows":
        return _qa("How many rows does the table have?", data["rows"], kind, answer_type="integer")
    if kind == "cols":
        return _qa("How many columns does the table have?", data["cols"], kind, answer_type="integer")
    if kind == "top_row":
        return _qa("What is written in the top row?", data["span_title"], kind)
    return _qa("Convert the table to HTML.", data["html"], kind)


# ------------------------------------------------------------------------------------------------------------ math


_MATH_FIGURES = ("triangle", "polygon", "segment", "line", "parabola")
_SLOPES = (-2.0, -1.0, -0.5, 0.5, 1.0, 2.0)


def _math_content(rng, figures=_MATH_FIGURES) -> dict:
    figure = _pick(rng, figures)
    style = {
        "background": _jitter(rng, (250, 246, 228), 6),
        "ink": _jitter(rng, _pick(rng, ((30, 40, 120), (20, 20, 20), (20, 90, 60))), 12),
        "fill": _jitter(rng, _pick(rng, ((205, 225, 250), (250, 235, 175), (215, 240, 210))), 8)
        if rng.random() < 0.5 else None,
        "curve": _jitter(rng, _pick(rng, ((200, 30, 30), (30, 60, 200), (30, 140, 60), (130, 40, 160))), 15),
        "grid": _jitter(rng, (190, 210, 235), 10),
    }
    data = {"figure": figure, "style": style}
    if figure == "triangle":
        while True:
            a, b = (int(v) * 10 for v in rng.integers(3, 9, size=2))
            if 180 - a - b >= 30:
                break
        data.update(angles=[a, b, 180 - a - b], mirrored=bool(rng.random() < 0.5))
    elif figure == "polygon":
        n = int(rng.integers(3, 9))
        data.update(sides=n, rotation=float(rng.uniform(0, 2 * math.pi)),
                    radii=[float(v) for v in rng.uniform(0.82, 1.0, size=n)],
                    angle_jitter=[float(v) for v in rng.uniform(-0.12, 0.12, size=n)])
    elif figure == "segment":
        data.update(parts=[int(v) for v in rng.integers(2, 10, size=2)], height=float(rng.uniform(0.45, 0.65)))
    elif figure == "line":
        data.update(slope=float(_pick(rng, _SLOPES)), intercept=int(rng.integers(-3, 4)))
    else:
        a = float(_pick(rng, (-1.0, -0.5, 0.5, 1.0)))
        k = int(rng.integers(-4, 2)) if a > 0 else int(rng.integers(-1, 5))
        data.update(a=a, vertex=[int(rng.integers(-3, 4)), k])
    return data


def _draw_math(data: dict, w: int, h: int) -> Image.Image:
    st = data["style"]
    canvas = _Canvas(w, h, st["background"])
    ink, unit = st["ink"], min(w, h)
    stroke = max(1.0, 0.035 * unit)
    label = max(4.0, 0.15 * unit)
    figure = data["figure"]
    if figure == "triangle":
        a, b, x = data["angles"]
        ra, rb = math.radians(a), math.radians(b)
        t = math.sin(rb) / math.sin(ra + rb)
        pts = [(0.0, 0.0), (1.0, 0.0), (t * math.cos(ra), t * math.sin(ra))]
        if data["mirrored"]:
            pts = [(1.0 - px, py) for px, py in pts]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        scale = min(0.76 * w / (max(xs) - min(xs)), 0.7 * h / (max(ys) - min(ys)))
        # flat or narrow triangles are stretched (not drawn to scale) so the angle labels fit
        scale_x = max(scale, 0.6 * w / (max(xs) - min(xs)))
        scale_y = max(scale, 0.5 * h / (max(ys) - min(ys)))
        ox = (w - scale_x * (max(xs) - min(xs))) / 2 - scale_x * min(xs)
        oy = (h + scale_y * (max(ys) - min(ys))) / 2 + scale_y * min(ys)
        img_pts = [(ox + scale_x * px, oy - scale_y * py) for px, py in pts]
        canvas.polygon(img_pts, fill=st["fill"], outline=ink, width=stroke)
        for i, (text, angle) in enumerate(zip((str(a), str(b), "x"), (a, b, x))):
            (px, py), others = img_pts[i], [img_pts[j] for j in range(3) if j != i]
            ux, uy = 0.0, 0.0
            for ox_, oy_ in others:  # the angle bisector: the sum of the unit vectors along both sides
                d = math.hypot(ox_ - px, oy_ - py)
                ux, uy = ux + (ox_ - px) / d, uy + (oy_ - py) / d
            norm = math.hypot(ux, uy)
            reach = min(0.085 * unit / math.sin(math.radians(angle) / 2), 0.3 * unit)
            canvas.text((px + ux / norm * reach, py + uy / norm * reach), text, 0.8 * label, ink, "sans-bold")
    elif figure == "polygon":
        n = data["sides"]
        pts = []
        for i in range(n):
            ang = data["rotation"] + 2 * math.pi * (i + data["angle_jitter"][i]) / n
            r = 0.38 * data["radii"][i]
            pts.append((w * (0.5 + r * math.cos(ang)), h * (0.5 + r * math.sin(ang))))
        canvas.polygon(pts, fill=st["fill"], outline=ink, width=stroke)
        for px, py in pts:
            canvas.ellipse((px - stroke, py - stroke, px + stroke, py + stroke), fill=ink)
    elif figure == "segment":
        p, q = data["parts"]
        y = data["height"] * h
        xa, xb = 0.1 * w, 0.9 * w
        xc = xa + (xb - xa) * p / (p + q)
        canvas.line([(xa, y), (xb, y)], ink, stroke)
        for xv, name in ((xa, "A"), (xc, "C"), (xb, "B")):
            canvas.line([(xv, y - 0.07 * h), (xv, y + 0.07 * h)], ink, stroke)
            canvas.text((xv, y + 0.17 * h), name, 0.8 * label, ink, "sans-bold")
        for x0, x1, v in ((xa, xc, p), (xc, xb, q)):
            canvas.text(((x0 + x1) / 2, y - 0.16 * h), str(v), label, st["curve"], "sans-bold")
    else:
        margin = 0.06
        sx, sy = w * (1 - 2 * margin) / 10, h * (1 - 2 * margin) / 10

        def to_px(xv, yv):
            return w * margin + (xv + 5) * sx, h * margin + (5 - yv) * sy

        grid_w = max(0.5, 0.012 * unit)
        for v in range(-5, 6):
            canvas.line([to_px(v, -5), to_px(v, 5)], st["grid"], grid_w)
            canvas.line([to_px(-5, v), to_px(5, v)], st["grid"], grid_w)
        axis = tuple(int(c * 0.6) for c in ink)
        canvas.line([to_px(-5, 0), to_px(5, 0)], axis, max(0.8, 0.022 * unit))
        canvas.line([to_px(0, -5), to_px(0, 5)], axis, max(0.8, 0.022 * unit))
        xs = np.linspace(-5, 5, 81)
        if figure == "line":
            ys = data["slope"] * xs + data["intercept"]
        else:
            ys = data["a"] * (xs - data["vertex"][0]) ** 2 + data["vertex"][1]
        keep = np.abs(ys) <= 5.4
        pts = [to_px(float(xv), float(yv)) for xv, yv in zip(xs[keep], ys[keep])]
        canvas.line(pts, st["curve"], max(1.0, 0.045 * unit))
    return canvas.result()


def _render_math(rng, w: int, h: int, figures=_MATH_FIGURES) -> tuple[Image.Image, dict]:
    data = _math_content(rng, figures)
    return _draw_math(data, w, h), data


def _ask_math(rng, data: dict, long_answers: bool = False, kinds=None) -> dict:
    figure = data["figure"]
    if figure == "triangle":
        x = data["angles"][2]
        question = "Two angles of the triangle are marked. What is the value of x?"
        if rng.random() < 0.5:
            choices = _number_choices(rng, x, list(range(30, 130, 10)))
            return _qa(_multi_choice(question, choices), x, "triangle_angle", "multi_choice", "integer", choices)
        return _qa(question, x, "triangle_angle", answer_type="integer")
    if figure == "polygon":
        return _qa("How many sides does the polygon have?", data["sides"], "polygon_sides", answer_type="integer")
    if figure == "segment":
        p, q = data["parts"]
        if rng.random() < 0.6:
            question, answer, kind = "What is the length of AB?", p + q, "segment_total"
        elif rng.random() < 0.5:
            question, answer, kind = "What is the length of AC?", p, "segment_part"
        else:
            question, answer, kind = "What is the length of CB?", q, "segment_part"
        if rng.random() < 0.3:
            choices = _number_choices(rng, answer, list(range(2, 20)))
            return _qa(_multi_choice(question, choices), answer, kind, "multi_choice", "integer", choices)
        return _qa(question, answer, kind, answer_type="integer")
    if figure == "line":
        kind = _pick_weighted(rng, {"slope_sign": 0.4, "intercept": 0.35, "slope": 0.25})
        if kind == "slope_sign":
            choices = ["positive", "negative"]
            answer = "positive" if data["slope"] > 0 else "negative"
            return _qa(_multi_choice("Is the slope of the line positive or negative?", choices), answer, kind,
                       "multi_choice", "text", choices)
        if kind == "intercept":
            return _qa("What is the y-intercept of the line?", data["intercept"], kind, answer_type="integer")
        return _qa("What is the slope of the line?", f"{data['slope']:.1f}", kind, answer_type="float", precision=1)
    kind = _pick_weighted(rng, {"parabola_direction": 0.4, "vertex_x": 0.3, "vertex_y": 0.3})
    if kind == "parabola_direction":
        choices = ["upward", "downward"]
        answer = "upward" if data["a"] > 0 else "downward"
        return _qa(_multi_choice("Does the parabola open upward or downward?", choices), answer, kind,
                   "multi_choice", "text", choices)
    axis = "x" if kind == "vertex_x" else "y"
    value = data["vertex"][0 if axis == "x" else 1]
    return _qa(f"What is the {axis}-coordinate of the vertex of the parabola?", value, kind, answer_type="integer")


# -------------------------------------------------------------------------------------------------------- document


def _document_content(rng) -> dict:
    n_title = 1 if rng.random() < 0.5 else 2
    title = " ".join(WORDS[int(i)] for i in rng.choice(len(WORDS), size=n_title, replace=False))
    paragraphs = []
    for _ in range(int(rng.integers(1, 4))):
        lines = int(rng.integers(1, 4))
        words = [[_pick(rng, WORDS) for _ in range(12)] for _ in range(lines)]
        paragraphs.append({"words": words, "last_fill": float(rng.uniform(0.3, 0.7))})
    style = {
        "background": _jitter(rng, _pick(rng, ((253, 253, 253), (250, 248, 242), (246, 246, 246))), 3),
        "title_color": _jitter(rng, _pick(rng, _INK), 10),
        "body_color": _jitter(rng, (80, 80, 80), 25),
        "title_font": _pick(rng, ("sans-bold", "serif-bold")),
        "body_font": _pick(rng, ("sans", "serif")),
        "centered": bool(rng.random() < 0.5),
        "rule": bool(rng.random() < 0.5),
        "margin": float(rng.uniform(0.05, 0.1)),
    }
    return {"title": title, "paragraphs": paragraphs, "style": style}


def _draw_document(data: dict, w: int, h: int) -> tuple[Image.Image, list]:
    st = data["style"]
    canvas = _Canvas(w, h, st["background"])
    m = st["margin"]
    size = canvas.fit(data["title"], 0.17 * h, st["title_font"], (1 - 2 * m) * w)
    tx = w / 2 if st["centered"] else m * w
    canvas.text((tx, 0.14 * h), data["title"], size, st["title_color"], st["title_font"],
                anchor="mm" if st["centered"] else "lm")
    if st["rule"]:
        canvas.line([(m * w, 0.25 * h), ((1 - m) * w, 0.25 * h)], st["title_color"], max(0.6, 0.015 * h))
    paragraphs = data["paragraphs"]
    slots = sum(len(p["words"]) for p in paragraphs) + len(paragraphs) - 1
    top = 0.3 * h
    lh = min(0.085 * h, ((1 - m) * h - top) / slots)
    font_size = 0.8 * lh
    y, rendered = top, []
    for p in paragraphs:
        lines = []
        for i, words in enumerate(p["words"]):
            indent = 0.08 * w if i == 0 else 0.0
            width = (1 - 2 * m) * w - indent
            if i == len(p["words"]) - 1:
                width *= p["last_fill"]
            text = words[0]
            for word in words[1:]:
                if canvas.text_width(text + " " + word, font_size, st["body_font"]) > width:
                    break
                text += " " + word
            canvas.text((m * w + indent, y + lh / 2), text, font_size, st["body_color"], st["body_font"], "lm")
            lines.append(text)
            y += lh
        rendered.append(lines)
        y += lh
    return canvas.result(), rendered


def _render_document(rng, w: int, h: int) -> tuple[Image.Image, dict]:
    content = _document_content(rng)
    image, rendered = _draw_document(content, w, h)
    data = {"title": content["title"], "paragraphs": rendered, "style": content["style"]}
    return image, data


def _ask_document(rng, data: dict, long_answers: bool = False, kinds=None) -> dict:
    kind_weights = {"title": 0.45, "paragraphs": 0.35, "title_words": 0.2}
    if kinds is not None:
        kind_weights = {k: v for k, v in kind_weights.items() if k in kinds}
    kind = _pick_weighted(rng, kind_weights)
    if kind == "title":
        return _qa("What is the title of the document?", data["title"], kind)
    if kind == "paragraphs":
        return _qa("How many paragraphs does the document have?", len(data["paragraphs"]), kind,
                   answer_type="integer")
    return _qa("How many words are in the title?", len(data["title"].split()), kind, answer_type="integer")


# ------------------------------------------------------------------------------------------------------------- ocr


def _ocr_text_content(rng) -> dict:
    is_word = bool(rng.random() < 0.5)
    text = _pick(rng, WORDS) if is_word else str(int(rng.integers(0, 21)))
    return {"text": text, "kind": "word" if is_word else "number", "font": _pick(rng, tuple(_FONT_FILES)),
            "rotation": float(rng.uniform(-30, 30)), "fill": float(rng.uniform(0.55, 0.92)),
            "offset": [float(v) for v in rng.uniform(-1, 1, size=2)]}


def _ocr_content(rng) -> dict:
    data = _ocr_text_content(rng)
    while True:
        bg = tuple(int(v) for v in rng.integers(0, 256, size=3))
        fg = tuple(int(v) for v in rng.integers(0, 256, size=3))
        if abs(_luminance(bg) - _luminance(fg)) > 0.45:
            break
    background = _pick(rng, ("solid", "gradient", "noise"))
    bg2 = _jitter(rng, bg, 60)
    data.update(color=fg, background=background, background_colors=[bg, bg2])
    return data


def _render_ocr(rng, w: int, h: int) -> tuple[Image.Image, dict]:
    data = _ocr_content(rng)
    noise = _noise_rng(rng)
    bg, bg2 = data["background_colors"]
    base = _gradient(w, h, bg, bg2) if data["background"] == "gradient" else Image.new("RGB", (w, h), bg)
    if data["background"] == "noise":
        base = _add_noise(base, noise, 14.0)
    canvas = _Canvas(w, h, image=base)
    _place_text(canvas, data["text"], data["font"], data["color"], data["rotation"], (0, 0, w, h), data["fill"],
                data["offset"])
    return canvas.result(), data


_OCR_QUESTIONS = ("What is written in the image?", "Read the text in the image.", "What word or number is shown?")


def _ask_ocr(rng, data: dict, long_answers: bool = False, kinds=None) -> dict:
    return _qa(_pick(rng, _OCR_QUESTIONS), data["text"], "transcribe",
               answer_type="integer" if data["kind"] == "number" else "text")


# --------------------------------------------------------------------------------------------------------- general


_SCENE_BACKGROUNDS = ((200, 200, 200), (226, 214, 188), (196, 222, 188), (188, 208, 230), (222, 196, 206))


def _general_content(rng, reserved=()) -> dict:
    """Up to 6 non-overlapping shapes in normalised coordinates, avoiding the `reserved` boxes (x0, y0, x1, y1)."""
    target = int(rng.integers(1, 7))
    shapes, tries = [], 0
    while len(shapes) < target and tries < 300:
        tries += 1
        r = float(rng.uniform(0.08, 0.13))
        x, y = (float(v) for v in rng.uniform(r + 0.02, 1 - r - 0.02, size=2))
        if any(math.hypot(x - s["x"], y - s["y"]) < 1.2 * (r + s["r"]) + 0.02 for s in shapes):
            continue
        if any(x + r > bx0 and x - r < bx1 and y + r > by0 and y - r < by1 for bx0, by0, bx1, by1 in reserved):
            continue
        shapes.append({"shape": _pick(rng, SHAPES), "color": _pick(rng, tuple(COLORS)), "x": x, "y": y, "r": r})
    for s in shapes:
        s["rgb"] = _jitter(rng, COLORS[s["color"]], 12)
    background = _pick(rng, ("plain", "gradient", "noise"))
    base = _jitter(rng, _pick(rng, _SCENE_BACKGROUNDS), 10)
    return {"shapes": shapes, "background": background,
            "background_colors": [base, _jitter(rng, _pick(rng, _SCENE_BACKGROUNDS), 10)],
            "noise": float(rng.uniform(8, 22)), "outline": bool(rng.random() < 0.3)}


def _draw_general(data: dict, w: int, h: int, noise_rng) -> _Canvas:
    bg, bg2 = data["background_colors"]
    base = _gradient(w, h, bg, bg2) if data["background"] == "gradient" else Image.new("RGB", (w, h), bg)
    if data["background"] == "noise":
        base = _add_noise(base, noise_rng, data["noise"])
    canvas = _Canvas(w, h, image=base)
    unit = min(w, h)
    outline = (30, 30, 30) if data["outline"] else None
    for s in data["shapes"]:
        x, y, r = s["x"] * w, s["y"] * h, s["r"] * unit
        if s["shape"] == "circle":
            canvas.ellipse((x - r, y - r, x + r, y + r), fill=s["rgb"], outline=outline, width=0.02 * unit)
        elif s["shape"] == "square":
            k = 0.85 * r
            canvas.rectangle((x - k, y - k, x + k, y + k), fill=s["rgb"], outline=outline, width=0.02 * unit)
        else:
            pts = [(x, y - r), (x + 0.95 * r, y + 0.75 * r), (x - 0.95 * r, y + 0.75 * r)]
            canvas.polygon(pts, fill=s["rgb"], outline=outline, width=0.02 * unit)
    return canvas


def _render_general(rng, w: int, h: int) -> tuple[Image.Image, dict]:
    data = _general_content(rng)
    return _draw_general(data, w, h, _noise_rng(rng)).result(), data


def _ask_general(rng, data: dict, long_answers: bool = False, kinds=None) -> dict:
    shapes = data["shapes"]
    by_shape = {name: [s for s in shapes if s["shape"] == name] for name in SHAPES}
    unique = [name for name in SHAPES if len(by_shape[name]) == 1]
    kind_weights = {"count_color_shape": 0.35, "count_shape": 0.25, "count_all": 0.15, "color": 0.25}
    if not unique:
        kind_weights.pop("color")
    kind = _pick_weighted(rng, kind_weights)
    if kind == "count_color_shape":
        if rng.random() < 0.8:
            s = shapes[int(rng.integers(len(shapes)))]
            color, shape = s["color"], s["shape"]
        else:
            color, shape = _pick(rng, tuple(COLORS)), _pick(rng, SHAPES)
        count = sum(1 for s in shapes if s["color"] == color and s["shape"] == shape)
        return _qa(f"How many {color} {shape}s are there?", count, kind, answer_type="integer")
    if kind == "count_shape":
        shape = _pick(rng, SHAPES)
        return _qa(f"How many {shape}s are there?", len(by_shape[shape]), kind, answer_type="integer")
    if kind == "count_all":
        return _qa("How many shapes are there?", len(shapes), kind, answer_type="integer")
    shape = _pick(rng, tuple(unique))
    return _qa(f"What color is the {shape}?", by_shape[shape][0]["color"], kind)


# ----------------------------------------------------------------------------------------------------------- mixed


def _render_mixed(rng, size: int, layout: str) -> tuple[Image.Image, str, str, dict, dict]:
    """Render a two-domain image; returns (image, primary domain, secondary domain, primary data, secondary data)."""
    first, second = MIXED_LAYOUTS[layout]
    primary = first if rng.random() < 0.5 else second
    secondary = second if primary == first else first
    w = h = size
    if layout in ("chart_in_document", "table_in_document"):
        content = _document_content(rng)
        page, rendered = _draw_document(content, w, h)
        doc = {"title": content["title"], "paragraphs": rendered, "style": content["style"]}
        if layout == "chart_in_document":
            side = float(rng.uniform(0.55, 0.65))
            x0 = float(rng.choice([0.06, 0.94 - side]))
            box = (x0 * w, (0.97 - side) * h, (x0 + side) * w, 0.97 * h)
            insert = _chart_content(rng)
            insert_img = _draw_chart(insert, round(box[2] - box[0]), round(box[3] - box[1]))
            other = "chart"
        else:
            box = (0.05 * w, 0.32 * h, 0.95 * w, 0.96 * h)
            insert = _table_content(rng)
            insert_img = _draw_table(insert, round(box[2] - box[0]), round(box[3] - box[1]))
            other = "table"
        canvas = _Canvas(w, h, image=page)
        canvas.paste(insert_img, box)
        image = canvas.result()
        parts = {"document": doc, other: insert}
    elif layout == "table_beside_plot":
        half = w // 2
        table_img, table = _render_table(rng, half, h, max_cols=2)
        plot_img, plot = _render_math(rng, w - half, h, figures=("line", "parabola"))
        table_left = bool(rng.random() < 0.5)
        image = Image.new("RGB", (w, h))
        image.paste(table_img if table_left else plot_img, (0, 0))
        image.paste(plot_img if table_left else table_img, (half, 0))
        parts = {"table": {**table, "left": table_left}, "math": plot}
    else:
        top = float(rng.uniform(0.05, 0.62))
        band = (0.0, top, 1.0, top + 0.33)
        scene = _general_content(rng, reserved=[band])
        text = _ocr_text_content(rng)
        text["rotation"] = float(rng.uniform(-8, 8))
        text["color"] = _pick(rng, ((20, 20, 20), (250, 250, 250), (30, 40, 120)))
        plate = rng.random() < 0.5
        canvas = _draw_general(scene, w, h, _noise_rng(rng))
        box = (0.04 * w, band[1] * h, 0.96 * w, band[3] * h)
        if plate:
            canvas.rectangle(box, fill=(245, 245, 240) if text["color"] != (250, 250, 250) else (40, 40, 40))
        _place_text(canvas, text["text"], text["font"], text["color"], text["rotation"], box, 0.85, text["offset"])
        image = canvas.result()
        parts = {"general": scene, "ocr": {**text, "band": list(band), "plate": bool(plate)}}
    return image, primary, secondary, parts[primary], parts[secondary]


_MIXED_KINDS = {"document": ("title", "title_words"), "chart": None, "table": None, "math": None, "ocr": None,
                "general": None}


# ------------------------------------------------------------------------------------------------------ public API


_RENDERERS = {"chart": _render_chart, "table": _render_table, "math": _render_math, "document": _render_document,
              "ocr": _render_ocr, "general": _render_general}
_ASKERS = {"chart": _ask_chart, "table": _ask_table, "math": _ask_math, "document": _ask_document, "ocr": _ask_ocr,
           "general": _ask_general}


def _json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


# Answers of the image-kind question (`kind_questions`): what a caption would call each domain's images.
IMAGE_KINDS = {"chart": "chart", "table": "table", "math": "diagram", "document": "document", "ocr": "word",
               "general": "shapes"}
# Every `question_kind` each domain's askers can produce (long-answer kinds included); `question_kinds` is checked
# against it.
QUESTION_KINDS = {
    "chart": ("value", "max", "min", "count", "type", "to_table"),
    "table": ("cell", "rows", "cols", "top_row", "to_html"),
    "math": ("triangle_angle", "segment_total", "segment_part", "polygon_sides", "slope", "slope_sign", "intercept",
             "parabola_direction", "vertex_x", "vertex_y"),
    "document": ("title", "paragraphs", "title_words"),
    "ocr": ("transcribe",),
    "general": ("count_color_shape", "count_shape", "count_all", "color"),
}
KIND_QUESTIONS = ("What kind of image is this?", "What type of picture is shown?", "Describe the image type.")


def _check_question_kinds(question_kinds):
    for name, kinds in (question_kinds or {}).items():
        if name not in QUESTION_KINDS:
            raise ValueError(f"question_kinds names an unknown domain {name!r}; expected some of {DOMAINS}.")
        if isinstance(kinds, str) or not kinds:
            raise ValueError(f"question_kinds[{name!r}] must be a non-empty list of question kinds, got {kinds!r}.")
        unknown = sorted(set(kinds) - set(QUESTION_KINDS[name]))
        if unknown:
            raise ValueError(f"question_kinds[{name!r}] has unknown kinds {unknown}; {name} questions are of kinds "
                             f"{list(QUESTION_KINDS[name])}.")


def _mixed_sample(rng: np.random.Generator, image_size: int, layout: str | None):
    """`generate_sample(domain="mixed")`'s parts: `(image, qa, primary, secondary, data, meta)`."""
    layout = layout if layout is not None else _pick(rng, tuple(MIXED_LAYOUTS))
    if layout not in MIXED_LAYOUTS:
        raise ValueError(f"Unknown mixed layout {layout!r}; known: {sorted(MIXED_LAYOUTS)}.")
    image, primary, secondary, data, other = _render_mixed(rng, image_size, layout)
    qa = _ASKERS[primary](rng, data, False, _MIXED_KINDS[primary])
    return image, qa, primary, secondary, data, {**data, "layout": layout, "secondary": other}


def _single_domain_sample(domain: str, rng: np.random.Generator, image_size: int, long_answers: bool,
                          allowed: Sequence[str] | None):
    """`(image, data, qa)` for one image of `domain` whose question kind is in `allowed` (any kind when None)."""
    if allowed is not None and not long_answers and set(allowed) <= {"to_table", "to_html"}:
        raise ValueError(f"question_kinds[{domain!r}] = {list(allowed)} only has long-answer kinds; pass "
                         "long_answers=True or allow a short-answer kind.")
    for _ in range(200):
        image, data = _RENDERERS[domain](rng, image_size, image_size)
        # Askers that know the kinds pick among the allowed ones; the others are asked again about the same image
        # (a few times, before drawing a new image: some figures allow none of the kinds).
        for _ in range(1 if allowed is None else 8):
            try:
                qa = _ASKERS[domain](rng, data, long_answers, allowed)
            except ValueError:  # no allowed kind for this content
                qa = None
                break
            if allowed is None or qa["question_kind"] in allowed:
                break
            qa = None
        if qa is not None:
            return image, data, qa
    raise ValueError(f"No {domain!r} sample with a question kind in {allowed} after 200 images.")


def generate_sample(domain: str, rng: np.random.Generator | int, image_size: int = 64, long_answers: bool = False,
                    layout: str | None = None, kind_questions: float = 0.0,
                    question_kinds: Mapping[str, Sequence[str]] | None = None) -> dict:
    """One image-QA sample.

    Args:
        domain: one of `DOMAINS`, or "mixed" for a two-domain image (see `MIXED_LAYOUTS`).
        rng: a `numpy.random.Generator` (e.g. `sample_rng(...)`) or an int seed.
        image_size (`int`, defaults to 64): side of the square RGB image in pixels (16 or more).
        long_answers (`bool`, defaults to False): also draw the long-answer tasks ("Convert the chart to a table.",
            "Convert the table to HTML."); mixed samples always have short answers.
        layout (`str`, *optional*): for `domain="mixed"`, the layout (a key of `MIXED_LAYOUTS`); default: random.
        kind_questions (`float`, defaults to 0.0): probability that a single-domain sample asks what kind of image it
            is (`IMAGE_KINDS`), the way captions in real VLM training data name charts, tables or documents. With 0
            nothing extra is drawn from `rng`, so samples are the same as without the option.
        question_kinds (`dict[str, list[str]]`, *optional*): per domain, the `question_kind`s allowed (e.g.
            `{"chart": ["type", "count"]}`); samples are redrawn from the same `rng` until the kind is allowed. Domains
            not in the dict keep every kind. For mixed samples it applies to the asked (primary) domain.

    Returns:
        A dict with `image` (PIL RGB), `question`, `answer`, `domain` (what the question is about),
        `secondary_domain` ("" unless mixed), `question_kind`, `question_type`, `answer_type`, `choices`,
        `precision`, `html` ("" unless the question is about a table) and `data` (JSON string of the source data;
        for mixed samples the primary domain's data plus `layout` and `secondary`).
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    _check_question_kinds(question_kinds)
    if question_kinds and domain == "mixed":
        for _ in range(200):
            sample = generate_sample(domain, rng, image_size, long_answers, layout, kind_questions)
            allowed = question_kinds.get(sample["domain"])
            if allowed is None or sample["question_kind"] in allowed:
                return sample
        raise ValueError(f"No mixed sample with a question kind in {question_kinds} after 200 draws.")
    image_size = int(image_size)
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}.")
    if domain == "mixed":
        image, qa, primary, secondary, data, meta = _mixed_sample(rng, image_size, layout)
    elif domain in _RENDERERS:
        image, data, qa = _single_domain_sample(domain, rng, image_size, long_answers,
                                                (question_kinds or {}).get(domain))
        if kind_questions > 0 and rng.random() < kind_questions:
            qa = _qa(_pick(rng, KIND_QUESTIONS), IMAGE_KINDS[domain], "image_kind")
        primary, secondary, meta = domain, "", data
    else:
        raise ValueError(f"Unknown domain {domain!r}; expected one of {DOMAINS} or 'mixed'.")
    return {"image": image, **qa, "domain": primary, "secondary_domain": secondary,
            "html": data.get("html", "") if primary == "table" else "", "data": _json(meta)}


def to_messages(row: Mapping) -> list[dict]:
    """A row's conversation in TRL's chat format: the user turn holds the image then the question, the assistant turn
    the answer (`[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
    {"role": "assistant", "content": [{"type": "text", "text": a}]}]`). Content items carry `text: None` for images
    so every item has the same keys (one Arrow schema)."""
    return [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": row["question"]}]},
        {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]},
    ]


def _row(sample: dict, row_id: str) -> dict:
    return {"id": row_id, **sample, "messages": to_messages(sample)}


def _to_dataset(rows: list[dict], features: datasets.Features, split: str | None = None) -> datasets.Dataset:
    """Rows -> a `Dataset` with `features` (column-wise, so an empty split keeps its schema)."""
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features, split=split)


def _split_sizes(num_per_domain) -> dict:
    if isinstance(num_per_domain, int):
        return {s: num_per_domain for s in SPLITS[:3]}
    unknown = set(num_per_domain) - set(SPLITS[:3])
    if unknown:
        raise ValueError(f"num_per_domain has unknown splits {sorted(unknown)}; use {SPLITS[:3]}.")
    return {s: int(num_per_domain.get(s, 0)) for s in SPLITS[:3]}


def build_dataset(num_per_domain: Mapping[str, int] | int | None = None, mixed: int = 60, seed: int = 0,
                  image_size: int = 64, domains: Sequence[str] = DOMAINS,
                  long_answers: bool = False, kind_questions: float = 0.0,
                  question_kinds: Mapping[str, Sequence[str]] | None = None) -> datasets.DatasetDict:
    """The synthetic set as a `datasets.DatasetDict` with splits train / validation / test / mixed (`FEATURES`).

    Args:
        num_per_domain (`dict` or `int`, defaults to `{"train": 200, "validation": 20, "test": 20}`): rows per domain
            in each split (an int: the same for all three; a missing split has 0 rows).
        mixed (`int`, defaults to 60): rows in the `mixed` split (two-domain images whose layouts only use `domains`).
        seed (`int`, defaults to 0): dataset seed; each row is drawn from `sample_rng(seed, split, domain, index)`.
        image_size (`int`, defaults to 64): image side in pixels.
        domains (`tuple[str]`, defaults to `DOMAINS`): the domains to include.
        long_answers (`bool`, defaults to False): see `generate_sample`.
        kind_questions (`float`, defaults to 0.0): see `generate_sample` (training and validation splits only: test
            and mixed questions stay about content).
        question_kinds (`dict`, *optional*): see `generate_sample` (every split).

    Rows are interleaved by domain (row `k` is domain `k % len(domains)`), so any prefix is balanced; `id` is
    "<split>-<domain>-<index>" ("mixed-<index>" in the mixed split).
    """
    domains = tuple(domains)
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown or not domains:
        raise ValueError(f"Unknown or no domains {unknown}; expected a subset of {DOMAINS}.")
    sizes = _split_sizes({"train": 200, "validation": 20, "test": 20} if num_per_domain is None else num_per_domain)
    splits = {}
    for split, n in sizes.items():
        rate = kind_questions if split in ("train", "validation") else 0.0
        rows = [_row(generate_sample(d, sample_rng(seed, split, d, i), image_size, long_answers, kind_questions=rate,
                                     question_kinds=question_kinds),
                     f"{split}-{d}-{i:05d}") for i in range(n) for d in domains]
        splits[split] = _to_dataset(rows, FEATURES, split)
    layouts = tuple(name for name, pair in MIXED_LAYOUTS.items() if set(pair) <= set(domains))
    if mixed and not layouts:
        raise ValueError(f"No mixed layout uses only {domains}; layouts: {MIXED_LAYOUTS}. Pass mixed=0.")
    rows = []
    for i in range(int(mixed)):
        rng = sample_rng(seed, "mixed", "mixed", i)
        rows.append(_row(generate_sample("mixed", rng, image_size, layout=_pick(rng, layouts),
                                         question_kinds=question_kinds), f"mixed-{i:05d}"))
    splits["mixed"] = _to_dataset(rows, FEATURES, "mixed")
    return datasets.DatasetDict(splits)


def save_dataset(dataset_dict: datasets.DatasetDict | datasets.Dataset, path: str | os.PathLike) -> None:
    """Write a `DatasetDict` (or `Dataset`) to the folder `path` (`save_to_disk`). Empty splits are written as one
    empty shard (with no shard at all, `load_from_disk` fails on them)."""
    if isinstance(dataset_dict, datasets.DatasetDict):
        shards = {name: 1 if len(split) == 0 else None for name, split in dataset_dict.items()}
        dataset_dict.save_to_disk(str(path), num_shards=shards)
    else:
        dataset_dict.save_to_disk(str(path), num_shards=1 if len(dataset_dict) == 0 else None)


def load_dataset(path: str | os.PathLike) -> datasets.DatasetDict:
    """Read back what `save_dataset` wrote (`datasets.load_from_disk`)."""
    return datasets.load_from_disk(str(path))


# ------------------------------------------------------------------------------------------------------ preference


_INT_POOLS = {
    ("chart", "value"): range(1, 10), ("chart", "count"): range(3, 6), ("table", "rows"): range(2, 5),
    ("table", "cols"): range(2, 4), ("math", "polygon_sides"): range(3, 9), ("math", "segment_total"): range(4, 19),
    ("math", "segment_part"): range(2, 10), ("math", "triangle_angle"): range(30, 130, 10),
    ("math", "intercept"): range(-3, 4), ("math", "vertex_x"): range(-3, 4), ("math", "vertex_y"): range(-4, 5),
    ("document", "paragraphs"): range(1, 4), ("document", "title_words"): range(1, 3),
    ("general", "count_color_shape"): range(0, 7), ("general", "count_shape"): range(0, 7),
    ("general", "count_all"): range(1, 7), ("ocr", "transcribe"): range(0, 21), ("table", "cell"): range(0, 21),
}


def _wrong_answer(row: Mapping, rng) -> str:
    """A plausible wrong answer from the same domain and question kind (another choice, a nearby number, another
    category / colour / word / chart type from the sample or the vocabulary)."""
    answer, kind, domain = row["answer"], row["question_kind"], row["domain"]
    data = json.loads(row["data"]) if row.get("data") else {}
    if row.get("choices"):
        pool = [c for c in row["choices"] if c != answer]
    elif kind == "to_table":
        values = list(data["values"])
        i = int(rng.integers(len(values)))
        values[i] = values[i] % 9 + 1
        return chart_table_text({"categories": data["categories"], "values": values})
    elif kind == "to_html":
        cells = [list(r) for r in data["cells"]]
        r, c = int(rng.integers(len(cells))), int(rng.integers(len(cells[0])))
        old = cells[r][c]
        cells[r][c] = str((int(old) + 1) % 21) if old.isdigit() else WORDS[(WORDS.index(old) + 1) % len(WORDS)]
        head = f'<tr><td colspan="{data["cols"]}">{data["span_title"]}</td></tr>' if data["span_title"] else ""
        return "<table>" + head + "".join(
            "<tr>" + "".join(f"<td>{v}</td>" for v in row_) + "</tr>" for row_ in cells) + "</table>"
    elif kind in ("max", "min"):
        pool = [c for c in data["categories"] if c != answer]
    elif kind == "type":
        pool = [t for t in CHART_TYPES if t != answer]
    elif kind == "color":
        present = [s["color"] for s in data["shapes"] if s["color"] != answer]
        pool = present or [c for c in COLORS if c != answer]
    elif kind == "slope":
        pool = [f"{s:.1f}" for s in _SLOPES if f"{s:.1f}" != answer]
    elif kind == "title":
        words = answer.split()
        pool = [" ".join([w, *words[1:]]) for w in WORDS if w != words[0]]
    elif kind in ("transcribe", "cell", "top_row") and not answer.lstrip("-").isdigit():
        pool = [w for w in WORDS if w != answer]
    elif answer.lstrip("-").isdigit():
        value = int(answer)
        candidates = [v for v in _INT_POOLS.get((domain, kind), range(value - 3, value + 4)) if v != value]
        near = sorted(candidates, key=lambda v: (abs(v - value), v))[:4]
        pool = [str(v) for v in near]
    else:
        pool = [w for w in WORDS if w != answer]
    return pool[int(rng.integers(len(pool)))]


def make_preference_pairs(dataset, seed: int = 0) -> datasets.Dataset:
    """DPO pairs from QA rows (a `datasets.Dataset` with `FEATURES` or a list of `generate_sample` dicts), one pair per
    row in the same order: `images` ([the image]), `prompt` (the user turn with an image item and the question),
    `chosen` (assistant turn with the right answer), `rejected` (assistant turn with a plausible wrong answer of the
    same domain and question kind, never equal to the right one) and `domain`.

    Args:
        dataset: the rows.
        seed (`int`, defaults to 0): seed of the wrong-answer choice (row `i` uses `default_rng([seed, i])`).
    """
    pairs = []
    for i, row in enumerate(dataset):
        rng = np.random.default_rng([int(seed), i])
        messages = to_messages(row)
        wrong = _wrong_answer(row, rng)
        pairs.append({
            "images": [row["image"]],
            "prompt": messages[:1],
            "chosen": messages[1:],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": wrong}]}],
            "domain": row["domain"],
        })
    return _to_dataset(pairs, PREFERENCE_FEATURES)
