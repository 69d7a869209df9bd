"""Draws the `toy-shapes` example dataset (made by the sdpipe authors; CC0).

A made-up concept, a "zorb": a yellow five-pointed star with a dark ring, drawn on varied
backgrounds, sizes and aspect ratios (so bucketing has work to do), saved as PNG, JPEG and
WebP, one JPEG rotated with an EXIF orientation tag, with caption sidecars for some images.
Run: python3 datasets/tools/make_toy_shapes.py (needs Pillow).
"""
import math
import os
import random

from PIL import Image, ImageDraw

OUT = os.path.join(os.path.dirname(__file__), "..", "toy-shapes")
BACKGROUNDS = {"blue": (40, 70, 200), "green": (40, 160, 80), "red": (190, 50, 50),
               "white": (235, 235, 235), "purple": (120, 60, 160), "gray": (110, 110, 110)}


def star(draw, cx, cy, r):
    pts = []
    for i in range(10):
        a = math.pi / 2 + i * math.pi / 5
        rr = r if i % 2 == 0 else r * 0.45
        pts.append((cx + rr * math.cos(a), cy - rr * math.sin(a)))
    draw.polygon(pts, fill=(250, 210, 40))
    draw.ellipse([cx - r * 1.1, cy - r * 1.1, cx + r * 1.1, cy + r * 1.1], outline=(30, 30, 30), width=max(2, int(r / 8)))


def main():
    random.seed(7)
    os.makedirs(OUT, exist_ok=True)
    specs = [
        ("zorb-01", (128, 128), "blue", "png", "a zorb on a blue background"),
        ("zorb-02", (160, 120), "green", "jpg", "a zorb on a green background, seen from the left"),
        ("zorb-03", (120, 160), "red", "png", None),
        ("zorb-04", (144, 144), "white", "webp", "a small zorb on a white background"),
        ("zorb-05", (192, 108), "purple", "jpg", None),
        ("zorb-06", (128, 128), "gray", "png", "a large zorb on a gray background"),
    ]
    for name, (w, h), bg, ext, caption in specs:
        img = Image.new("RGB", (w, h), BACKGROUNDS[bg])
        d = ImageDraw.Draw(img)
        r = min(w, h) * random.uniform(0.25, 0.4)
        star(d, w / 2 + random.uniform(-10, 10), h / 2 + random.uniform(-10, 10), r)
        path = os.path.join(OUT, f"{name}.{ext}")
        if ext == "jpg" and name == "zorb-05":
            # Stored rotated; EXIF orientation 6 (rotate 90° clockwise to view) restores it.
            exif = Image.Exif()
            exif[0x0112] = 6
            img.transpose(Image.Transpose.ROTATE_90).save(path, quality=92, exif=exif.tobytes())
        elif ext == "jpg":
            img.save(path, quality=92)
        elif ext == "webp":
            img.save(path, lossless=True)
        else:
            img.save(path, optimize=True)
        if caption:
            with open(os.path.join(OUT, f"{name}.txt"), "w") as f:
                f.write(caption + "\n")


if __name__ == "__main__":
    main()
