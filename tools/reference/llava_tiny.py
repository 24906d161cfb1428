"""Random tiny HF LlavaForConditionalGeneration models and their outputs, for
parity tests of the decoder, projector, VLM layout, chat template and greedy
generation.

Two configs: a CLIP vision tower (32², patch 8, layer -2, strategy
"default") with a Llama text model (GQA, linear RoPE scaling, untied head);
and a CLIP tower (48², patch 16, layer -1, strategy "full") with a Qwen2
text model (q/k/v bias, tied embeddings). A byte-level BPE tokenizer is
trained on the easy-VQA questions, with a ChatML-style multimodal chat
template.

  python tools/reference/llava_tiny.py
"""
import json
import os

import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoTokenizer, CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaProcessor, PreTrainedTokenizerFast)

HOME = os.environ.get("AUTOGLM_HOME", os.path.expanduser("~/.cache/autoglm"))
OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures")
SPECIAL = ["<pad>", "<s>", "</s>", "<image>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONFIGS = {
    "llava-tiny-llama": dict(
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                    image_size=32, patch_size=8, hidden_act="quick_gelu", projection_dim=32),
        text_type="llama",
        text=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                  rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=False,
                  hidden_act="silu"),
        layer=-2, strategy="default",
    ),
    "llava-tiny-qwen2": dict(
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    image_size=48, patch_size=16, hidden_act="gelu", projection_dim=32),
        text_type="qwen2",
        text=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  tie_word_embeddings=True, hidden_act="silu", use_sliding_window=False),
        layer=-1, strategy="full",
    ),
}
CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the shape?"}]}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "is there a circle?"}]},
     {"role": "assistant", "content": "no"},
     {"role": "user", "content": [{"type": "text", "text": "and this one?"}, {"type": "image"}]}],
]


def make_tokenizer():
    qs = json.load(open(os.path.join(HOME, "easy-vqa", "train", "questions.json")))
    corpus = [q[0] for q in qs[:5000]] + [q[1] for q in qs[:5000]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=CHAT_TEMPLATE)


def main():
    torch.set_num_threads(2)
    base_tok = make_tokenizer()
    photos = [Image.open(os.path.join(HOME, "photos", p)).convert("RGB") for p in ["chelsea.png", "coffee.png"]]
    for i, (name, c) in enumerate(CONFIGS.items()):
        torch.manual_seed(4321 + i)
        out = os.path.join(OUT, name)
        os.makedirs(out, exist_ok=True)
        tok = base_tok
        vocab = len(tok)
        image_id = tok.convert_tokens_to_ids("<image>")
        text = dict(c["text"], vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id, model_type=c["text_type"])
        cfg = LlavaConfig(vision_config=dict(c["vision"], model_type="clip_vision_model"), text_config=text,
                          image_token_index=image_id, vision_feature_layer=c["layer"],
                          vision_feature_select_strategy=c["strategy"], projector_hidden_act="gelu",
                          tie_word_embeddings=c["text"]["tie_word_embeddings"])
        model = LlavaForConditionalGeneration(cfg).eval()
        with torch.no_grad():  # make norms and biases non-trivial
            for n, p in model.named_parameters():
                if "norm" in n or n.endswith(".bias"):
                    p.add_(torch.randn_like(p) * 0.1)
        model.generation_config.eos_token_id = None  # always 16 new tokens
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(out, safe_serialization=True)
        size = c["vision"]["image_size"]
        proc_img = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        processor = LlavaProcessor(image_processor=proc_img, tokenizer=tok, chat_template=CHAT_TEMPLATE,
                                   patch_size=c["vision"]["patch_size"],
                                   vision_feature_select_strategy=c["strategy"], num_additional_image_tokens=1)
        processor.save_pretrained(out)
        tok.save_pretrained(out)
        ref, meta = {}, {"conversations": CONVERSATIONS, "rendered": [], "generated": []}
        for k, conv in enumerate(CONVERSATIONS):
            prompt = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            meta["rendered"].append(prompt)
            n_img = prompt.count("<image>")
            inputs = processor(images=photos[:n_img], text=prompt, return_tensors="pt")
            with torch.no_grad():
                logits = model(**inputs).logits
                gen = model.generate(**inputs, max_new_tokens=16, do_sample=False)
            new = gen[0, inputs["input_ids"].shape[1]:]
            ref[f"conv{k}.input_ids"] = inputs["input_ids"].to(torch.int64).contiguous()
            ref[f"conv{k}.pixel_values"] = inputs["pixel_values"].contiguous()
            ref[f"conv{k}.logits"] = logits.contiguous()
            ref[f"conv{k}.generated"] = new.to(torch.int64).contiguous()
            meta["generated"].append(tok.decode(new))
        # The text model alone on plain ids, for the decoder and KV cache tests.
        ids = torch.tensor([tok.encode("what is the color of the circle? blue")])
        with torch.no_grad():
            ref["text.input_ids"] = ids.contiguous()
            ref["text.logits"] = model(input_ids=ids).logits.contiguous()
        save_file(ref, os.path.join(out, "reference.safetensors"))
        json.dump(meta, open(os.path.join(out, "reference.json"), "w"), indent=1)
        print(name, "vocab", vocab, "image tokens", (ref["conv0.input_ids"] == image_id).sum().item(),
              "generated", meta["generated"][0][:60])


if __name__ == "__main__":
    main()
