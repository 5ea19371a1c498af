"""Compose the README's pictures (teacher and every student, same seeds) from a `diffdistill demo` report.

    diffdistill demo --out demo-report
    python scripts/readme_grids.py demo-report docs/images
"""

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

DIGITS = [("teacher", "heun", 18), ("kd", "onestep", 1), ("pd", "euler", 1), ("pd", "euler", 4),
          ("di", "onestep", 1), ("gdd", "onestep", 1), ("cd", "onestep", 1), ("cd", "multistep", 4),
          ("dmd2", "onestep", 1), ("sid", "onestep", 1)]
RING = [("teacher", "heun", 18), ("kd", "onestep", 1), ("pd", "euler", 1), ("di", "onestep", 1),
        ("gdd", "onestep", 1), ("cd", "onestep", 1), ("cd", "multistep", 2), ("dmd2", "onestep", 1),
        ("sid", "onestep", 1)]


def compose(cells, out: Path, width: int, height: int, cols: int, crop_rows: float | None) -> None:
    """Tiles with a caption each; `crop_rows` keeps that top fraction of a grid image (a few rows of digits)."""
    rows = (len(cells) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * (width + 10) + 10, rows * (height + 30) + 10), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (path, label) in enumerate(cells):
        x, y = 10 + (k % cols) * (width + 10), 10 + (k // cols) * (height + 30)
        image = Image.open(path).convert("RGB")
        if crop_rows:
            image = image.crop((0, 0, image.width, int(image.height * crop_rows)))
        canvas.paste(image.resize((width, height), Image.NEAREST if crop_rows else Image.LANCZOS), (x, y))
        draw.text((x, y + height + 6), label, fill="black")
    canvas.save(out)


def main(report: str, out_dir: str) -> None:
    report_dir, out_dir = Path(report), Path(out_dir)
    rows = json.loads((report_dir / "results.json").read_text())["rows"]

    def pick(track, order, caption):
        table = {(r["method"], r["sampler"], r["steps"]): r for r in rows
                 if r["track"] == track and r["model"] != "teacher (toy preset)"}
        return [(report_dir / table[k]["image"], f"{k[0]}: NFE {table[k]['nfe']}, {caption(table[k])}")
                for k in order if k in table and table[k].get("image")]

    # Digits: the first four rows of each 10-column grid (one class per column).
    compose(pick("digits", DIGITS, lambda r: f"FID {r['fid']:.1f}"), out_dir / "digits_methods.png",
            400, 160, 2, 0.4)
    compose(pick("ring", RING, lambda r: f"{100 * r['within_3std']:.0f}% within 3 std"),
            out_dir / "ring_methods.png", 180, 180, 5, None)


if __name__ == "__main__":
    main(*sys.argv[1:3])
