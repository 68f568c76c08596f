"""``batchery explain``: each image beside its heatmap overlay, with the label and the score.

Through the queue like any job (``explain=True``); Pillow only, no TensorFlow: the worker
computed the attribution map, this draws it for a person.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

#: Side of each of the two panels, in pixels.
PANEL = 224


def overlay(image: bytes, result: dict[str, Any]) -> Image.Image:
    """The input (left) and the heatmap in red over it (right), with a caption."""
    with Image.open(io.BytesIO(image)) as img:
        base = img.convert("L").resize((PANEL, PANEL), Image.Resampling.NEAREST)
    explanation = result.get("explanation") or {}
    if "png" in explanation:
        with Image.open(io.BytesIO(base64.b64decode(explanation["png"]))) as heat_img:
            heat = heat_img.convert("L").resize((PANEL, PANEL), Image.Resampling.BILINEAR)
    else:
        heat = Image.new("L", (PANEL, PANEL), 0)
    gray = base.convert("RGB")
    red = Image.merge("RGB", (heat, Image.new("L", heat.size, 0), Image.new("L", heat.size, 0)))
    tinted = Image.composite(red, gray, heat.point(lambda v: min(255, v * 2)))
    canvas = Image.new("RGB", (2 * PANEL, PANEL + 28), "white")
    canvas.paste(gray, (0, 0))
    canvas.paste(tinted, (PANEL, 0))
    if result.get("status") == "SUCCESS":
        caption = f"label {result.get('label')}  score {float(result.get('score') or 0):.3f}"
        if "error" in explanation:
            caption += "  (no explanation: LiteRT version)"
    else:
        caption = f"{result.get('status')}: {str(result.get('error'))[:60]}"
    ImageDraw.Draw(canvas).text((6, PANEL + 8), caption, fill="black")
    return canvas


def write_overlays(
    inputs: list[Path], images: list[bytes], results: list[dict[str, Any]], out_dir: Path
) -> list[Path]:
    """One ``<name>.explained.png`` per input in ``out_dir``; their paths, in input order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (path, data, result) in enumerate(zip(inputs, images, results, strict=True)):
        target = out_dir / f"{index:04d}-{path.stem}.explained.png"
        overlay(data, result).save(target)
        written.append(target)
    return written
