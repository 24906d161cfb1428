"""Fixtures for image decoding: one small crop of a real photo saved in each
format and mode we accept, beside PIL's own decode of it converted to RGB
(what the reference preprocessors feed their models).

  python tools/reference/decode_formats.py
"""
import os

from PIL import Image

HOME = os.environ.get("AUTOGLM_HOME", os.path.expanduser("~/.cache/autoglm"))
OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "decode")
os.makedirs(OUT, exist_ok=True)

src = Image.open(os.path.join(HOME, "photos", "chelsea.png")).convert("RGB").crop((150, 60, 214, 108))  # 64×48
alpha = Image.linear_gradient("L").resize(src.size)
samples = {
    "rgb.webp": (src, dict(lossless=True)),
    "lossy.webp": (src, dict(quality=80)),
    "gray.png": (src.convert("L"), {}),
    "gray_alpha.png": (Image.merge("LA", (src.convert("L"), alpha)), {}),
    "rgba.png": (Image.merge("RGBA", (*src.split(), alpha)), {}),
    "palette.png": (src.convert("P", palette=Image.ADAPTIVE, colors=32), {}),
    "palette.gif": (src.convert("P", palette=Image.ADAPTIVE, colors=64), {}),
    "gray.jpg": (src.convert("L"), dict(quality=90)),
    "q75_420.jpg": (src, dict(quality=75, subsampling=2)),
    "progressive.jpg": (src, dict(quality=85, progressive=True)),
}
for name, (im, kw) in samples.items():
    path = os.path.join(OUT, name)
    im.save(path, **kw)
    Image.open(path).convert("RGB").save(path + ".pil.png")
print(sorted(os.listdir(OUT)))
