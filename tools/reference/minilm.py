"""Reference fixtures for the MiniLM sentence encoder (all-MiniLM-L6-v2).

sentence-transformers, loaded from the files scripts/fetch-assets.sh installs,
embeds the sentences in tests/fixtures/minilm/sentences.json; the vectors and
the token ids its tokenizer produced (after its own truncation at
max_seq_length) are saved as fixtures.

  python tools/reference/minilm.py
"""
import json
import os

import torch
from safetensors.torch import save_file
from sentence_transformers import SentenceTransformer

HOME = os.environ.get("AUTOGLM_HOME", os.path.expanduser("~/.cache/autoglm"))
OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "minilm")
torch.set_num_threads(2)

sentences = json.load(open(os.path.join(OUT, "sentences.json")))
model = SentenceTransformer(os.path.join(HOME, "minilm"), device="cpu")
emb = model.encode(sentences, convert_to_tensor=True, batch_size=8)
ids = [model.tokenize([s])["input_ids"][0].tolist() for s in sentences]
save_file({"embeddings": emb.contiguous()}, os.path.join(OUT, "embeddings.safetensors"))
json.dump({"max_seq_length": model.max_seq_length, "input_ids": ids}, open(os.path.join(OUT, "tokens.json"), "w"))
print(emb.shape, [len(i) for i in ids])
