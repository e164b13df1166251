"""Chat templates (Jinja, in transformers' ``apply_chat_template`` format) shared by backbones and the core.

An assistant turn ends with ``{{ eos_token }}``, the tokenizer's own end-of-sequence token (``</s>``
for Llama and Vicuna, ``<|im_end|>`` for ChatML models), so the end of a reply is always one special
token that training labels and generation stops at. A message's content is either a string (the
``<image>`` placeholder inline) or a list of parts (``{"type": "image"}``, ``{"type": "text", ...}``).
"""

# One message's content: a string as is, or its parts in order (an image part renders as "<image>\n").
_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
)

# "USER: <image>\n... ASSISTANT: ...</s>" turns, as in LLaVA-1.5 (conv_vicuna_v1 without its system line).
LLAVA_TURNS = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: " + _CONTENT + " "
    "{% else %}ASSISTANT: " + _CONTENT + "{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# LLaVA's conv_vicuna_v1 (the paper's template): the system line, then the same turns.
VICUNA_V1 = (
    "{{ 'A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user\\'s questions. ' }}" + LLAVA_TURNS
)

# InstructBLIP's own format (LAVIS): the instruction as is, the answer after a space, then the end token.
PLAIN = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + _CONTENT + "{% else %} " + _CONTENT + "{{ eos_token }}"
    "{% endif %}{% endfor %}"
)
