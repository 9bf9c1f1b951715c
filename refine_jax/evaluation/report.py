"""A self-contained HTML report of an evaluation: metrics, per-step curves, and per image the K
descriptions with what each step added, its CIDEr, and where the model looked.

Everything is inline (CSS, and images and plots as base64 PNG data URIs); the page makes no
request and runs no script, so it opens offline. Sections: the metrics, per-step curves (CIDEr_k,
progress p_k and length ratio against the schedule s(k)), the worst final captions, the images
whose quality dropped at some step, and one card per shown image (at most `max_images`).

Command line (needs Chromium, e.g. Debian's `chromium`; the command lives in
refine_jax/commands/report_in_browser.py):
    python -m refine_jax.evaluation.report --report=REPORT.html --screenshot=OUT.png [--width=1280]
    python -m refine_jax.evaluation.report --report=REPORT.html  # console errors, broken images
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath
from PIL import Image

from refine_jax.evaluation.attention import word_diff

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--disable-default-apps",
    "--disable-extensions",
    "--mute-audio",
)


@dataclass
class ReportImage:
    """What the report shows of one image."""

    index: int  # its position in the evaluated split: names its card (ids may repeat)
    image_id: str
    references: list[str]
    steps: list[str]
    cider: list[float]
    image: np.ndarray | None = None  # uint8 [H, W, 3], the model's view of the image
    heatmaps: list[np.ndarray | None] = field(default_factory=list)  # per step, uint8 overlay
    heatmap_words: list[list[str]] = field(default_factory=list)  # the words each map is for
    match_score: list[float] | None = None  # per step, with a matching model (--match_workdir)


def png_data_uri(image: np.ndarray) -> str:
    """uint8 [H, W, 3] (or [H, W]) -> 'data:image/png;base64,...'."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure_uri(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def step_plots(metrics: dict, schedule: Sequence[float]) -> dict[str, str]:
    """PNG data URIs of the per-step curves: `cider`, `progress` and `length` (the last two
    against the schedule; absent when the metric is undefined)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(metrics["cider_per_step"]) + 1)
    plots: dict[str, str] = {}
    curves = {
        "cider": ("CIDEr-D per step", "CIDEr-D", metrics["cider_per_step"], False),
        "progress": (
            "Progress p_k vs schedule s(k)",
            "progress",
            metrics.get("progress_per_step"),
            True,
        ),
        "length": (
            "Length ratio len_k/len_K vs schedule",
            "length ratio",
            metrics.get("length_ratio_per_step"),
            True,
        ),
        "match": (
            "Image-text match score per step",
            "match score",
            metrics.get("match_score_per_step"),
            False,
        ),
    }
    for key, (title, label, values, with_schedule) in curves.items():
        if values is None:
            continue
        figure, axis = plt.subplots(figsize=(4.2, 3.0))
        axis.plot(steps, values, "o-", color="#1f5fa8", label=label)
        if with_schedule:
            axis.plot(steps, schedule, "s--", color="#c0392b", label="schedule s(k)")
            axis.set_ylim(-0.05, 1.05)
        axis.set_xticks(steps)
        axis.set_xlabel("step k")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        plots[key] = _figure_uri(figure)
        plt.close(figure)
    return plots


def select_images(per_image: Sequence[dict], limit: int) -> tuple[list[int], list[int], list[int]]:
    """(shown, worst, dropped) indices into `per_image` (refinement_metrics' per-image dicts).

    worst: every image by final CIDEr, lowest first; dropped: images whose CIDEr fell at some
    step, largest fall first. shown (at most `limit`): the dropped ones (up to half the budget)
    and the worst ones, in worst-first order."""
    final = [p["cider"][-1] for p in per_image]
    worst = sorted(range(len(per_image)), key=lambda i: (final[i], i))
    fall = {
        i: max(0.0, -float(np.min(np.diff(p["cider"]))))
        for i, p in enumerate(per_image)
        if not p["monotonic"]
    }
    dropped = sorted(fall, key=lambda i: (-fall[i], i))
    limit = max(0, int(limit))
    chosen = set(dropped[: limit // 2])
    for i in worst:
        if len(chosen) >= limit:
            break
        chosen.add(i)
    shown = [i for i in worst if i in chosen]
    return shown, worst, dropped


def _anchor(index: int) -> str:
    return f"img-{index}"


def diff_html(previous: str, current: str) -> str:
    """The current description with added words marked <ins> and dropped ones <del>."""
    if not current.strip() and not previous.strip():
        return '<span class="blank">(blank)</span>'
    marks = {"same": "{}", "add": "<ins>{}</ins>", "drop": "<del>{}</del>"}
    return " ".join(
        marks[kind].format(html.escape(word)) for kind, word in word_diff(previous, current)
    )


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def _metrics_table(metrics: dict) -> str:
    rows = [
        f"<tr><th>{html.escape(k)}</th><td>{_number(v)}</td></tr>"
        for k, v in metrics.items()
        if isinstance(v, int | float | str) and not isinstance(v, bool)
    ]
    return "<table class='metrics'>" + "".join(rows) + "</table>"


def _step_table(metrics: dict, schedule: Sequence[float], weights: Sequence[float]) -> str:
    columns = [
        ("s(k)", list(schedule)),
        ("w_k", list(weights)),
        ("CIDEr-D", metrics["cider_per_step"]),
        ("BLEU-4", metrics["bleu4_per_step"]),
        ("progress p_k", metrics.get("progress_per_step")),
        ("length ratio", metrics.get("length_ratio_per_step")),
        ("chain agreement", metrics.get("chain_agreement")),
        ("match score", metrics.get("match_score_per_step")),
        ("ref-match score", metrics.get("ref_match_score_per_step")),
    ]
    columns = [(name, values) for name, values in columns if values is not None]
    head = "<tr><th>step</th>" + "".join(f"<th>{html.escape(n)}</th>" for n, _ in columns)
    body = "".join(
        f"<tr><td>{k + 1}</td>"
        + "".join(f"<td>{float(v[k]):.4f}</td>" for _, v in columns)
        + "</tr>"
        for k in range(len(metrics["cider_per_step"]))
    )
    return f"<table class='steps'>{head}</tr>{body}</table>"


def _card(item: ReportImage) -> str:
    thumb = (
        f"<img class='thumb' alt='{html.escape(item.image_id)}' src='{png_data_uri(item.image)}'>"
        if item.image is not None
        else ""
    )
    rows, previous = [], ""
    for k, text in enumerate(item.steps):
        heat = item.heatmaps[k] if k < len(item.heatmaps) else None
        words = item.heatmap_words[k] if k < len(item.heatmap_words) else []
        if heat is not None:
            look = (
                f"<img class='heat' alt='attention, step {k + 1}' src='{png_data_uri(heat)}'>"
                f"<div class='for'>{html.escape(' '.join(words))}</div>"
            )
        else:
            look = "<span class='none'>no words added</span>"
        cider = f"{item.cider[k]:.3f}" if k < len(item.cider) else ""
        drop = k > 0 and k < len(item.cider) and item.cider[k] < item.cider[k - 1] - 1e-9
        match = ""
        if item.match_score is not None:  # the step where the image-text score fell is marked
            fell = k > 0 and item.match_score[k] < item.match_score[k - 1]
            match = f"<td class='{'fell' if fell else ''}'>{item.match_score[k]:.3f}</td>"
        rows.append(
            f"<tr><td>{k + 1}</td><td class='desc'>{diff_html(previous, text)}</td>"
            f"<td class='{'fell' if drop else ''}'>{cider}</td>{match}<td>{look}</td></tr>"
        )
        previous = text
    references = "".join(f"<li>{html.escape(r)}</li>" for r in item.references)
    match_head = "<th>match</th>" if item.match_score is not None else ""
    return (
        f"<section class='card' id='{_anchor(item.index)}'>{thumb}<div class='body'>"
        f"<h3>{html.escape(item.image_id)}</h3><table class='chain'><tr><th>step</th>"
        f"<th>description (<ins>added</ins>, <del>dropped</del>)</th><th>CIDEr</th>{match_head}"
        f"<th>where it looked for the added words</th></tr>{''.join(rows)}</table>"
        f"<details><summary>{len(item.references)} reference(s)</summary>"
        f"<ul>{references}</ul></details></div></section>"
    )


STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 1.5em auto;
       max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
table.metrics th { font-weight: normal; font-family: monospace; }
.plots img { margin: .3em; border: 1px solid #eee; }
.card { display: flex; gap: 1em; border: 1px solid #ddd; border-radius: 6px; padding: .8em;
        margin: .8em 0; }
.card .body { flex: 1; }
.card h3 { margin: 0 0 .3em 0; font-family: monospace; }
img.thumb { width: 160px; height: 160px; image-rendering: auto; border: 1px solid #ccc; }
img.heat { width: 96px; height: 96px; display: block; }
.for { font-size: .8em; color: #555; max-width: 110px; }
td.desc { min-width: 22em; }
ins { background: #d4f7d4; text-decoration: none; padding: 0 .1em; }
del { background: #fadcdc; color: #999; }
.blank, .none { color: #999; font-style: italic; }
td.fell { color: #b00; font-weight: bold; }
nav a { margin-right: 1em; }
.note { color: #666; font-size: .9em; }
"""


def render_report(
    metrics: dict,
    images: Sequence[ReportImage],
    schedule: Sequence[float],
    weights: Sequence[float],
    worst: Sequence[int] = (),
    dropped: Sequence[int] = (),
    title: str = "Evaluation report",
    info: dict | None = None,
) -> str:
    """The report as one HTML string. `images` are the cards to show (in order); `worst` (every
    image, lowest final CIDEr first) and `dropped` order the split's positions for the two
    sorted views, which list the images that have a card, each with its rank among all."""
    by_index = {item.index: item for item in images}
    info_rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in (info or {}).items()
    )
    plots = "".join(
        f"<img alt='{key} per step' src='{uri}'>"
        for key, uri in step_plots(metrics, schedule).items()
    )

    def link(item: ReportImage) -> str:
        return f"<a href='#{_anchor(item.index)}'>{html.escape(item.image_id)}</a>"

    worst_rows = "".join(
        f"<tr><td>{rank}</td><td>{link(item)}</td><td>{item.cider[-1]:.3f}</td>"
        f"<td>{html.escape(item.steps[-1]) or '<span class=blank>(blank)</span>'}</td></tr>"
        for rank, item in ((r + 1, by_index.get(i)) for r, i in enumerate(worst))
        if item is not None
    )
    drop_rows = []
    for i in dropped:
        item = by_index.get(i)
        if item is None:
            continue
        falls = np.diff(item.cider)
        k = int(np.argmin(falls)) + 1  # the step (0-based) where CIDEr fell most
        drop_rows.append(
            f"<tr><td>{link(item)}</td><td>{k} &rarr; {k + 1}</td>"
            f"<td>{item.cider[k - 1]:.3f} &rarr; {item.cider[k]:.3f}</td>"
            f"<td>{diff_html(item.steps[k - 1], item.steps[k])}</td></tr>"
        )
    shown_drops = len(drop_rows)
    cards = "".join(_card(item) for item in images)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<nav><a href="#summary">Summary</a><a href="#curves">Per-step curves</a>
<a href="#worst">Worst final captions</a><a href="#dropped">Quality drops</a>
<a href="#images">Images</a></nav>
<h2 id="summary">Summary</h2>
<table class="info">{info_rows}</table>
{_metrics_table(metrics)}
{_step_table(metrics, schedule, weights)}
<h2 id="curves">Per-step curves</h2>
<div class="plots">{plots}</div>
<h2 id="worst">Worst final captions</h2>
<p class="note">Lowest final CIDEr-D first; {len(images)} of {len(worst)} images are shown
in this report.</p>
<table><tr><th>rank</th><th>image</th><th>final CIDEr</th><th>final description</th></tr>
{worst_rows}</table>
<h2 id="dropped">Images whose quality dropped at some step</h2>
<p class="note">{len(dropped)} image(s) lost CIDEr-D from one step to the next
({shown_drops} shown, largest fall first).</p>
<table><tr><th>image</th><th>steps</th><th>CIDEr</th><th>what changed</th></tr>
{"".join(drop_rows)}</table>
<h2 id="images">Images</h2>
{cards}
</body></html>
"""


def write_report(path: str | epath.PathLike, *args: Any, **kwargs: Any) -> epath.Path:
    """Renders the report (arguments of `render_report`) to `path` (local or a URI)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(*args, **kwargs), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Headless Chromium: checking and screenshots.


def find_chromium() -> str | None:
    """Path of a Chromium / Chrome binary ($CHROMIUM overrides), or None."""
    override = os.environ.get("CHROMIUM")
    if override:
        return override if shutil.which(override) or Path(override).exists() else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _run_chromium(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found (install Debian's `chromium`, or set $CHROMIUM)")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "HOME": profile},
        )


_PROBE = """<script>
window.__problems = [];
window.addEventListener('error', function (e) {
  var t = e.target;
  if (t && t !== window && (t.src || t.href)) {
    window.__problems.push('failed to load ' + String(t.src || t.href).slice(0, 60));
  } else { window.__problems.push('error: ' + e.message); }
}, true);
['error', 'warn'].forEach(function (level) {
  var original = console[level];
  console[level] = function () {
    window.__problems.push(level + ': ' + Array.prototype.join.call(arguments, ' '));
    original.apply(console, arguments);
  };
});
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !i.complete || i.naturalWidth === 0; });
  var out = document.createElement('pre');
  out.id = '__report_check';
  out.textContent = JSON.stringify({images: images.length, broken: broken.length,
    broken_alts: broken.map(function (i) { return i.alt; }), problems: window.__problems});
  document.body.appendChild(out);
});
</script>"""

_CONSOLE = re.compile(r":(INFO|WARNING|ERROR|FATAL):CONSOLE(?:\(\d+\)|:\d+)\] (.*)")


def check_in_browser(report: str | os.PathLike, timeout: float = 120.0) -> dict:
    """Loads a copy of the report, with a probe script added at the top of <head>, in headless
    Chromium and returns {images, broken, broken_alts, problems, console}: the number of <img>,
    those that did not load (naturalWidth 0), script errors / failed loads / console errors seen
    by the probe, and the console lines Chromium logged. Raises FileNotFoundError without
    Chromium, RuntimeError when the probe's result is missing from the dumped DOM."""
    text = Path(report).read_text(encoding="utf-8")
    probed = re.sub(r"<head>", "<head>" + _PROBE, text, count=1)
    with tempfile.TemporaryDirectory(prefix="report-check-") as tmp:
        page = Path(tmp) / "report.html"
        page.write_text(probed, encoding="utf-8")
        result = _run_chromium(
            [
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=10000",
                "--dump-dom",
                page.as_uri(),
            ],
            timeout,
        )
    match = re.search(r'<pre id="__report_check">(.*?)</pre>', result.stdout, re.S)
    if match is None:
        raise RuntimeError(
            f"Chromium did not report on the page (exit {result.returncode}): "
            f"{result.stderr[-2000:]}"
        )
    outcome = json.loads(html.unescape(match.group(1)))
    outcome["console"] = [m.group(2) for m in map(_CONSOLE.search, result.stderr.splitlines()) if m]
    return outcome


def screenshot(
    report: str | os.PathLike,
    output: str | os.PathLike,
    width: int = 1280,
    height: int = 3000,
    timeout: float = 120.0,
) -> Path:
    """Saves a PNG screenshot (width x height, from the top) of the report by headless Chromium."""
    output = Path(output).absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    result = _run_chromium(
        [
            f"--window-size={width},{height}",
            f"--screenshot={output}",
            "--virtual-time-budget=10000",
            Path(report).absolute().as_uri(),
        ],
        timeout,
    )
    if not output.exists():
        raise RuntimeError(
            f"Chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-2000:]}"
        )
    return output


if __name__ == "__main__":  # the command lives in refine_jax/commands/report_in_browser.py
    import runpy

    runpy.run_module("refine_jax.commands.report_in_browser", run_name="__main__", alter_sys=True)
