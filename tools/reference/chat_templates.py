"""Chat templates rendered by transformers' `apply_chat_template`, for the
template engine's parity test: templates written the way real checkpoints
write them (multi-line blocks that depend on trim_blocks / lstrip_blocks,
Python string methods, loop variables, namespace(), multimodal content).

  python tools/reference/chat_templates.py
"""
import json
import os

from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "chat_templates.json")

TEMPLATES = {
    # LLaVA-1.5 / Llama-2 style, multi-line: whitespace control matters.
    "llava_style": """{% for message in messages %}
    {% if message['role'] == 'system' %}
        {{ message['content'] }}
    {% elif message['role'] == 'user' %}
USER: {% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>
{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}

    {% else %}
ASSISTANT: {{ message['content'] }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}ASSISTANT:{% endif %}""",
    # Qwen2-VL style with namespace counters and loop.last.
    "qwen_vl_style": """{% set image_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}<|im_start|>{{ message['role'] }}
{% if message['content'] is string %}{{ message['content'] }}<|im_end|>
{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}{% set image_count.value = image_count.value + 1 %}Picture {{ image_count.value }}: <|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>
{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}""",
    # Python string methods and raise_exception, as Llama/Mistral templates use.
    "pymethods": """{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}{% else %}{{ ' ' + message['content'].strip() | upper + eos_token }}{% endif %}{% endfor %}""",
}

CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown here?"}]}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "text", "text": " and "}, {"type": "image"}]},
     {"role": "assistant", "content": "They differ."},
     {"role": "user", "content": "  How?  "}],
]
TEXT_ONLY = [
    [{"role": "user", "content": "  hello there "}, {"role": "assistant", "content": " hi! "}, {"role": "user", "content": "what is 2+2?"}],
]

tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), bos_token="<s>", eos_token="</s>")
cases = []
for name, tpl in TEMPLATES.items():
    convs = TEXT_ONLY if name == "pymethods" else CONVERSATIONS
    for conv in convs:
        for agp in (False, True):
            text = tok.apply_chat_template(conv, chat_template=tpl, tokenize=False, add_generation_prompt=agp)
            cases.append({"name": name, "template": tpl, "messages": conv, "add_generation_prompt": agp,
                          "rendered": text})
# An error the template raises on purpose.
bad = [{"role": "assistant", "content": "first"}]
try:
    tok.apply_chat_template(bad, chat_template=TEMPLATES["pymethods"], tokenize=False)
except Exception as e:  # jinja2 TemplateError
    cases.append({"name": "pymethods", "template": TEMPLATES["pymethods"], "messages": bad,
                  "add_generation_prompt": False, "error": str(e)})
json.dump({"bos_token": "<s>", "eos_token": "</s>", "cases": cases}, open(OUT, "w"), indent=1, ensure_ascii=False)
print(len(cases), "cases")
