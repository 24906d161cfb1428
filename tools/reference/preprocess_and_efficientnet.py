"""Reference fixtures for image preprocessing and EfficientNet-Lite0.

For every sample photo:
  - torchvision's Resize(256) + CenterCrop(224) on the PIL image (bilinear),
    saved as PNG: the exact 8-bit pixels EfficientNet's reference sees;
  - HF CLIPImageProcessor's resize (bicubic, shortest edge 224) + center crop,
    without rescale/normalise, saved as PNG;
  - EfficientNet-Lite0 logits (efficientnet-lite-pytorch) on the torchvision
    pipeline normalised with the Lite models' (x - 127) / 128.

Run with the reference virtualenv (see tools/reference/README.md):
  python tools/reference/preprocess_and_efficientnet.py
"""
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms
from transformers import CLIPImageProcessor

HOME = os.environ.get("AUTOGLM_HOME", os.path.expanduser("~/.cache/autoglm"))
OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures")
PHOTOS = [
    "chelsea.png", "coffee.png", "astronaut.png", "horse.png", "motorcycle_left.png",
    "rocket.jpg", "camera.png", "retina.jpg", "hubble_deep_field.jpg", "logo.png",
    "coins.png", "no_time_for_that_tiny.gif",
]

torch.set_num_threads(2)
os.makedirs(os.path.join(OUT, "preprocess"), exist_ok=True)
os.makedirs(os.path.join(OUT, "efficientnet"), exist_ok=True)

crop = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
to_tensor = transforms.Compose([
    transforms.ToTensor(),
    transforms.Normalize([127.0 / 255] * 3, [128.0 / 255] * 3),
])
clip_proc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                               do_rescale=False, do_normalize=False)

from efficientnet_lite_pytorch import EfficientNet
# The original legacy .pth, as installed by scripts/fetch-assets.sh.
model = EfficientNet.from_pretrained("efficientnet-lite0",
                                     weights_path=os.path.join(HOME, "efficientnet-lite0", "efficientnet-lite0.pth"))
model.eval()

labels = open(os.path.join(HOME, "imagenet", "labels.txt")).read().splitlines()
batch, summary = [], {}
for name in PHOTOS:
    img = Image.open(os.path.join(HOME, "photos", name)).convert("RGB")
    c = crop(img)
    stem = name.rsplit(".", 1)[0]
    c.save(os.path.join(OUT, "preprocess", f"{stem}.effnet.png"))
    arr = clip_proc(img, return_tensors="np")["pixel_values"][0]  # (3, 224, 224) float of 0..255
    Image.fromarray(np.rint(arr.transpose(1, 2, 0)).astype(np.uint8)).save(
        os.path.join(OUT, "preprocess", f"{stem}.clip.png"))
    batch.append(to_tensor(c))

x = torch.stack(batch)
# Stage outputs: the last block of each of the 7 stages (repeats 1,2,2,3,3,4,1).
stage_ends = [0, 2, 4, 7, 10, 14, 15]
stages = {}
for i, b in enumerate(stage_ends):
    model._blocks[b].register_forward_hook(lambda m, inp, out, i=i: stages.__setitem__(i, out))
with torch.no_grad():
    logits = model(x)
    pooled = model.extract_features(x).mean((2, 3))
save_file({"logits": logits.contiguous()}, os.path.join(OUT, "efficientnet", "logits.safetensors"))
# Pooled head features of every photo; stage maps of the first photo (the
# three large early stages as per-channel means, to keep the fixture small).
feats = {"pooled": pooled.contiguous()}
for i in range(7):
    s0 = stages[i][0]
    feats[f"stage{i}"] = (s0.mean((1, 2)) if i < 3 else s0).contiguous()
save_file(feats, os.path.join(OUT, "efficientnet", "features.safetensors"))
probs = logits.softmax(-1)
for name, p in zip(PHOTOS, probs):
    top = p.topk(5)
    summary[name] = [[int(i), labels[int(i)], float(v)] for v, i in zip(top.values, top.indices)]
json.dump({"photos": PHOTOS, "top5": summary}, open(os.path.join(OUT, "efficientnet", "reference.json"), "w"), indent=1)
for name in PHOTOS:
    print(name, summary[name][:2])
