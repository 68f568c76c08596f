"""Camera-sized photos, made here: nothing can be downloaded on these machines.

``python -m bench.photos OUT N`` writes N JPEGs of 4000x3000 (12 megapixels, a phone
camera's size), at quality 90, 2 to 5 MB each. Each is built like a photo's content: a smooth
colour field (sky, walls, light falling off), mid-scale texture (foliage, fabric), hard-edged
shapes (objects, horizons), and fine sensor grain, which is what makes real JPEGs big. Every
photo differs (a seed each); ``distinct`` of them are drawn and the rest hard-linked to them,
so a 20,000-photo folder costs the disk of a few hundred (state that where figures are given).
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFilter

SIZE = (4000, 3000)


def make_photo(path: Path, seed: int, size: tuple[int, int] = SIZE, quality: int = 90) -> int:
    """One photo-like JPEG at ``path``; its size in bytes."""
    rng = random.Random(seed)
    width, height = size

    def field(cells: tuple[int, int], resample: Image.Resampling) -> Image.Image:
        small = Image.frombytes("RGB", cells, rng.randbytes(cells[0] * cells[1] * 3))
        return small.resize(size, resample)

    photo = field((6, 4), Image.Resampling.BICUBIC)  # light and colour, smooth
    texture = field((width // 16, height // 16), Image.Resampling.BILINEAR)
    photo = Image.blend(photo, texture, 0.25)
    draw = ImageDraw.Draw(photo)
    for _ in range(rng.randint(8, 20)):  # objects: hard edges
        x, y = rng.randrange(width), rng.randrange(height)
        w, h = rng.randint(width // 40, width // 4), rng.randint(height // 40, height // 4)
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        if rng.random() < 0.5:
            draw.ellipse((x, y, x + w, y + h), fill=colour)
        else:
            draw.polygon([(x, y), (x + w, y + rng.randint(-h, h)), (x + rng.randint(0, w), y + h)],
                         fill=colour)  # fmt: skip
    photo = photo.filter(ImageFilter.GaussianBlur(1.2))  # a lens is not a pixel grid
    grain = Image.effect_noise(size, rng.uniform(4, 9)).convert("RGB")
    photo = ImageChops.add(photo, grain, scale=1.0, offset=-128)
    photo.save(path, format="JPEG", quality=quality)
    return path.stat().st_size


def make_photos(folder: Path, n: int, distinct: int = 100, size: tuple[int, int] = SIZE
                ) -> list[Path]:  # fmt: skip
    """``n`` photos in ``folder``: ``distinct`` drawn, the rest hard links to them."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo_{i:06d}.jpg" for i in range(n)]
    for i, path in enumerate(paths):
        if path.exists():
            continue
        if i < distinct:
            make_photo(path, seed=i, size=size)
        else:
            os.link(paths[i % distinct], path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("n", type=int)
    parser.add_argument("--distinct", type=int, default=100)
    args = parser.parse_args()
    paths = make_photos(args.out, args.n, args.distinct)
    sizes = [p.stat().st_size for p in paths[: args.distinct]]
    print(f"{len(paths)} photos in {args.out}: {min(sizes) / 1e6:.1f} to "
          f"{max(sizes) / 1e6:.1f} MB, {len(sizes)} distinct")  # fmt: skip


if __name__ == "__main__":
    main()


def full_decode(data: bytes, size: tuple[int, int], mode: str) -> Image.Image:
    """The tutorial way, the reference the fast path is measured against: every pixel
    decoded, converted, then resized."""
    import io

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert(mode).resize(size, Image.Resampling.BILINEAR)
