"""The demo's report: `index.html` (self-contained but for the sample images, referenced relatively),
`report.md` (the same tables, plots as SVG files beside it) and `results.json` (every number).

Everything here is a pure function of the results dictionary that `pipeline.run_demo` builds.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from ..io import atomic_write, atomic_write_json

FID_LABEL = "FID (digits-classifier features; not Inception)"
PALETTE = ("#1f5ab4", "#d9480f", "#2b8a3e", "#ae3ec9", "#e8590c", "#0c8599", "#c2255c", "#5c940d", "#495057",
           "#f08c00", "#364fc7")

TRACK_TITLES = {
    "ring": "Ring of 8 Gaussians (toy:ring8, exact teacher)",
    "digits": "Digits (sklearn 8x8, class-conditional teacher trained here)",
}


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return str(value)


def _seconds(value) -> str:
    return "—" if value is None else f"{value:.1f}"


def columns(track: str) -> list[tuple[str, str]]:
    """(key, heading) of the quality columns of a track."""
    if track == "ring":
        return [("modes_covered", "modes (of 8)"), ("within_3std", "within 3 std"),
                ("sliced_w2", "sliced W2")]
    return [("fid", FID_LABEL)]


def primary_metric(track: str) -> tuple[str, str]:
    return ("sliced_w2", "sliced W2 (lower is better)") if track == "ring" else ("fid", FID_LABEL)


def table_rows(results: dict, track: str) -> list[list[str]]:
    """One track's table as strings: model, sampler, steps, NFE, quality..., sampling, training, status."""
    out = []
    for r in results["rows"]:
        if r["track"] != track:
            continue
        quality = [_fmt(r.get(k)) if r.get("status") == "ok" else "—" for k, _ in columns(track)]
        status = "ok" if r.get("status") == "ok" else f"failed: {r.get('error')}"
        out.append([r["model"], str(r.get("sampler") or "recipe"), _fmt(r.get("steps")), _fmt(r.get("nfe")),
                    *quality, _fmt(r.get("ms_per_sample")), _seconds(r.get("train_seconds")), status])
    return out


def headings(track: str) -> list[str]:
    return ["model", "sampler", "steps", "NFE", *[h for _, h in columns(track)], "sampling (ms/sample)",
            "training (s)", "status"]


def notes(results: dict, track: str) -> list[str]:
    floors = results.get("floors", {})
    n = results["profile"]["n_eval"]
    if track == "ring":
        exact, floor = floors.get("ring_within_3std_true"), floors.get("ring_sliced_w2_noise_floor")
        lines = [f"Metrics of {n} samples (seeds 0-{n - 1}) against the exact mixture: modes with at least "
                 "one sample within 3 std; the fraction within 3 std of its mode "
                 f"(exact: {_fmt(exact, 4)}); sliced 2-Wasserstein distance to {n} exact samples (two exact "
                 f"sample sets: {_fmt(floor)})."]
    else:
        lines = [f"{FID_LABEL} of {n} samples (seeds 0-{n - 1}, class = seed mod 10) against all "
                 f"{floors.get('digits_n', 1797)} digits; two random halves of the data set score "
                 f"{_fmt(floors.get('digits_fid_split_half'))} against each other. FID of a few hundred "
                 "samples is biased upwards: compare rows with each other, not with published numbers."]
    if track == "ring":
        lines.append("Heun with 2 steps on EDM's grid evaluates its correction at sigma_min = 0.002 and "
                     "extrapolates it over the whole interval: it is worse than 1 step (EDM's sampler does "
                     "the same).")
    lines.append("Training time is the wall time of the model's own stage (students: not counting the "
                 "teacher). NFE: network evaluations per sample (Heun: 2 per step but the last).")
    return lines


# --------------------------------------------------------------------------------------------------
# The plot of quality against NFE (SVG)


def series(results: dict, track: str) -> dict[str, list[tuple[int, float]]]:
    """Points (NFE, quality) per curve: teachers by sampler, students by method."""
    key, _ = primary_metric(track)
    curves: dict[str, list[tuple[int, float]]] = {}
    for r in results["rows"]:
        if r["track"] != track or r.get("status") != "ok":
            continue
        value = r.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not r.get("nfe"):
            continue
        name = f"{r['model']} {r['sampler']}" if r["method"] == "teacher" else r["model"]
        curves.setdefault(name, []).append((int(r["nfe"]), float(value)))
    return {k: sorted(v) for k, v in curves.items()}


def svg_plot(results: dict, track: str, width: int = 640, height: int = 340) -> str:
    """Quality against NFE (log2 axis), one line or marker per model; a self-contained <svg> element."""
    _, label = primary_metric(track)
    return svg_line_chart(series(results, track), xlabel="NFE (network evaluations per sample, log scale)",
                          ylabel=label, log2_x=True, width=width, height=height,
                          dashed=lambda name: name.endswith("euler"))


def _nice_ticks(hi: float, n: int = 5) -> list[float]:
    """About n round ticks from 0 to at least hi (steps of 1, 2 or 5 times a power of ten)."""
    raw = hi / n if hi > 0 else 1.0
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return [step * i for i in range(int(math.ceil(hi / step - 1e-9)) + 1)]


def svg_line_chart(curves: dict[str, list[tuple[float, float]]], *, xlabel: str, ylabel: str,
                   log2_x: bool = False, hlines: dict[str, float] | None = None, width: int = 640,
                   height: int = 340, dashed=lambda name: False) -> str:
    """A self-contained <svg> line chart: one polyline (or marker, for a single point) per curve, x on a log2
    axis with power-of-two ticks (`log2_x`) or a linear one from 0, y linear from 0 or logarithmic when the values
    span more than a factor of 20; `hlines` are dashed horizontal reference lines (e.g. a teacher's value)."""
    hlines = {k: v for k, v in (hlines or {}).items() if v is not None and math.isfinite(v)}
    left, right, top, bottom = 64, 190, 16, 44
    pw, ph = width - left - right, height - top - bottom
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11" role="img" '
             f'aria-label="{html.escape(ylabel)} against {html.escape(xlabel)}">',
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>']
    curves = {k: [(float(x), float(y)) for x, y in pts if math.isfinite(y) and (x > 0 or not log2_x)]
              for k, pts in curves.items()}
    curves = {k: v for k, v in curves.items() if v}
    values = [v for pts in curves.values() for _, v in pts] + list(hlines.values())
    xs = [x for pts in curves.values() for x, _ in pts]
    if not xs:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no results to plot'
                     '</text></svg>')
        return "".join(parts)
    if log2_x:
        xlo, xhi = -0.25, max(2.0, math.log2(max(xs)) + 0.25)
        xticks = [2 ** k for k in range(int(xhi) + 1)]
    else:
        xticks = _nice_ticks(max(xs))
        xlo, xhi = 0.0, xticks[-1]
    lo, hi = min(values), max(values)
    log_y = lo > 0 and hi / lo > 20
    if log_y:
        ylo, yhi = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        yhi = yhi if yhi > ylo else ylo + 1
        yticks = [10.0 ** e for e in range(int(ylo), int(yhi) + 1)]
    else:
        yticks = _nice_ticks(hi * 1.05 if hi > 0 else 1.0)
        ylo, yhi = 0.0, yticks[-1]

    def px(x: float) -> float:
        t = math.log2(x) if log2_x else x
        return left + (t - xlo) / (xhi - xlo) * pw

    def py(v: float) -> float:
        t = (math.log10(v) - ylo) / (yhi - ylo) if log_y else (v - ylo) / (yhi - ylo)
        return top + ph - t * ph

    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#adb5bd"/>')
    for x in xticks:
        u = px(x)
        parts.append(f'<line x1="{u:.1f}" y1="{top}" x2="{u:.1f}" y2="{top + ph}" stroke="#f1f3f5"/>'
                     f'<text x="{u:.1f}" y="{top + ph + 14}" text-anchor="middle">{_fmt(x, 4)}</text>')
    for v in yticks:
        y = py(v)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#f1f3f5"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(v, 2)}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">{html.escape(xlabel)}</text>')
    parts.append(f'<text transform="translate(14 {top + ph / 2}) rotate(-90)" text-anchor="middle">'
                 f'{html.escape(ylabel)}{" (log)" if log_y else ""}</text>')
    # curves and legend; single points at the same x are spread sideways by 5 px
    singles = [name for name, pts in curves.items() if len(pts) == 1]
    dodge = {name: 5.0 * (k - (len(singles) - 1) / 2) for k, name in enumerate(singles)}
    legend = 0
    for i, (name, pts) in enumerate(curves.items()):
        colour = PALETTE[i % len(PALETTE)]
        shift = dodge.get(name, 0.0)
        dash = ' stroke-dasharray="4 3"' if dashed(name) else ""
        if len(pts) > 1:
            path = " ".join(f"{px(x):.1f},{py(v):.1f}" for x, v in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" '
                         f'stroke-width="1.8"{dash}/>')
        for x, v in pts:
            parts.append(f'<circle cx="{px(x) + shift:.1f}" cy="{py(v):.1f}" r="{3.5 if len(pts) < 30 else 2}" '
                         f'fill="{colour}"><title>{html.escape(name)}: {_fmt(x, 4)}, {_fmt(v, 4)}</title></circle>')
        ly = top + 8 + 16 * legend
        legend += 1
        parts.append(f'<line x1="{width - right + 12}" y1="{ly}" x2="{width - right + 32}" y2="{ly}" '
                     f'stroke="{colour}" stroke-width="2"{dash}/><circle cx="{width - right + 22}" cy="{ly}" '
                     f'r="3" fill="{colour}"/><text x="{width - right + 38}" y="{ly + 4}">'
                     f'{html.escape(name)}</text>')
    for name, v in hlines.items():
        y = py(v)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#212529" '
                     f'stroke-width="1.2" stroke-dasharray="6 4"><title>{html.escape(name)}: {_fmt(v, 4)}</title>'
                     '</line>')
        ly = top + 8 + 16 * legend
        legend += 1
        parts.append(f'<line x1="{width - right + 12}" y1="{ly}" x2="{width - right + 32}" y2="{ly}" '
                     f'stroke="#212529" stroke-dasharray="6 4"/><text x="{width - right + 38}" y="{ly + 4}">'
                     f'{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------------------------------
# Markdown and HTML


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(h) for h in head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _summary(results: dict) -> str:
    p = results["profile"]
    stages = results["stages"]
    reused = sum(bool(s.get("reused")) for s in stages)
    train = sum(s.get("seconds") or 0.0 for s in stages)
    again = f", {reused} of {len(stages)} stages reused from an earlier run" if reused else ""
    return (f"Profile `{p['name']}` ({p.get('budget', '')}); device {results['device']}, "
            f"torch {results['torch']}, {results['threads']} CPU thread(s); started {results['started']}, "
            f"took {results['seconds'] / 60:.1f} min{again}; training time of all stages "
            f"{train / 60:.1f} min.")


def _gallery(results: dict, track: str) -> list[dict]:
    """One picture per evaluated row that has one, in table order."""
    items = []
    for r in results["rows"]:
        if r["method"] == "teacher" and r.get("sampler") != "heun":
            continue                    # the teachers' Euler pictures are in results.json's image paths
        if r["track"] == track and r.get("status") == "ok" and r.get("image"):
            key, _ = primary_metric(track)
            caption = f"{r['model']}: {r['sampler']} {r['steps']} step{'s' if r['steps'] != 1 else ''} " \
                      f"(NFE {r['nfe']}), {key.replace('_', ' ')} {_fmt(r.get(key))}"
            items.append(dict(src=r["image"], caption=caption))
    return items


def failures(results: dict) -> list[dict]:
    return [s for s in results["stages"] if not s.get("ok")]


def markdown(results: dict) -> str:
    out = ["# diffdistill demo", "", _summary(results), "",
           "Every teacher and student is sampled from the same seeds; students are distilled from the "
           "teacher of their data set with the settings listed under *Commands*. Rerun `diffdistill demo` "
           "with the same options to reuse finished stages.", ""]
    for f in failures(results):
        out += [f"> **{f['key']} failed:** {f['error']}", ""]
    for track in results["tracks"]:
        table = _md_table(headings(track), table_rows(results, track))
        out += [f"## {TRACK_TITLES.get(track, track)}", "", table, ""]
        out += [*notes(results, track), ""]
        out += [f"![{primary_metric(track)[1]} against NFE](plot-{track}.svg)", "", "### Samples", ""]
        for item in _gallery(results, track):
            out += [f"![{item['caption']}]({item['src']})", f"*{item['caption']}*", ""]
    out += ["## Commands", "", "| stage | command | time (s) | status |", "|---|---|---|---|"]
    for s in results["stages"]:
        status = ("reused" if s.get("reused") else "ok") if s.get("ok") else f"failed: {s.get('error')}"
        out.append(f"| {s['key']} | `{s['command']}` | {_seconds(s.get('seconds'))} | "
                   f"{status.replace('|', '/')} |")
    out += ["", "All numbers are in `results.json`.", ""]
    return "\n".join(out)


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1120px;
       color: #212529; padding: 0 16px; line-height: 1.4; }
h1 { margin-bottom: 4px; } h2 { margin-top: 32px; border-bottom: 1px solid #dee2e6; padding-bottom: 4px; }
p.meta { color: #495057; margin-top: 0; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #dee2e6; padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: #f1f3f5; } td.l, th.l { text-align: left; }
tr.failed td { background: #fff5f5; color: #c92a2a; }
tr.teacher td { background: #f8f9fa; }
.note { font-size: 13px; color: #495057; max-width: 900px; }
.alert { background: #fff5f5; border: 1px solid #ffc9c9; color: #c92a2a; padding: 6px 10px; margin: 6px 0; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 210px; font-size: 12px; color: #495057; }
figure img { width: 210px; height: 210px; border: 1px solid #dee2e6; }
figure.images { width: 320px; } figure.images img { width: 320px; height: 320px; }
code { font-size: 12px; } td code { white-space: pre-wrap; word-break: break-all; }
"""


def html_page(results: dict) -> str:
    esc = html.escape
    body = [f"<h1>diffdistill demo</h1><p class='meta'>{esc(_summary(results))}</p>",
            "<p class='note'>Every teacher and student is sampled from the same seeds; students are "
            "distilled from the teacher of their data set with the settings listed under <em>Commands</em>. "
            "Rerun <code>diffdistill demo</code> with the same options to reuse finished stages. Every "
            "number is in <a href='results.json'>results.json</a>; the same report as Markdown: "
            "<a href='report.md'>report.md</a>.</p>"]
    for f in failures(results):
        body.append(f"<div class='alert'><b>{esc(f['key'])} failed:</b> {esc(str(f['error']))}</div>")
    for track in results["tracks"]:
        body.append(f"<h2>{esc(TRACK_TITLES.get(track, track))}</h2>")
        head = headings(track)
        cells = "".join(f"<th class='{'l' if i in (0, 1, len(head) - 1) else ''}'>{esc(h)}</th>"
                        for i, h in enumerate(head))
        body.append(f"<table><thead><tr>{cells}</tr></thead><tbody>")
        track_rows = [r for r in results["rows"] if r["track"] == track]
        for r, row in zip(track_rows, table_rows(results, track)):
            cls = "failed" if r.get("status") != "ok" else ("teacher" if r["method"] == "teacher" else "")
            tds = "".join(f"<td class='{'l' if i in (0, 1, len(row) - 1) else ''}'>{esc(c)}</td>"
                          for i, c in enumerate(row))
            body.append(f"<tr class='{cls}'>{tds}</tr>")
        body.append("</tbody></table>")
        body += [f"<p class='note'>{esc(line)}</p>" for line in notes(results, track)]
        body.append(svg_plot(results, track))
        what = ("each column one class, 0 to 9" if track != "ring" else
                "blue: samples; grey: exact samples from the same number of seeds")
        body.append(f"<h3>Samples</h3><p class='note'>{esc(what)}; the teacher with Heun steps.</p>"
                    "<div class='gallery'>")
        for item in _gallery(results, track):
            body.append(f"<figure class='{'images' if track != 'ring' else 'points'}'>"
                        f"<img src='{esc(item['src'])}' alt='{esc(item['caption'])}'>"
                        f"<figcaption>{esc(item['caption'])}</figcaption></figure>")
        body.append("</div>")
    body.append("<h2>Commands</h2><table><thead><tr><th class='l'>stage</th><th class='l'>command</th>"
                "<th>time (s)</th><th class='l'>status</th></tr></thead><tbody>")
    for s in results["stages"]:
        status = ("reused" if s.get("reused") else "ok") if s.get("ok") else f"failed: {s.get('error')}"
        cls = "" if s.get("ok") else "failed"
        body.append(f"<tr class='{cls}'><td class='l'>{esc(s['key'])}</td><td class='l'><code>"
                    f"{esc(s['command'])}</code></td><td>{_seconds(s.get('seconds'))}</td>"
                    f"<td class='l'>{esc(status)}</td></tr>")
    body.append("</tbody></table>")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>diffdistill demo</title>"
            f"<meta name='viewport' content='width=device-width'><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_report(out: str | Path, results: dict) -> Path:
    """Write DIR/results.json, DIR/plot-TRACK.svg, DIR/report.md and DIR/index.html; returns index.html."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    for track in results["tracks"]:
        svg = svg_plot(results, track)
        atomic_write(out / f"plot-{track}.svg", lambda p, svg=svg: p.write_text(svg + "\n"))
    md = markdown(results)
    atomic_write(out / "report.md", lambda p: p.write_text(md))
    page = html_page(results)
    atomic_write(out / "index.html", lambda p: p.write_text(page))
    return out / "index.html"
