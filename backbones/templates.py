"""Chat templates (Jinja, in transformers' ``apply_chat_template`` format) shared by backbones and the core."""

# "USER: <image>\n... ASSISTANT: ...</s>" turns, as in llava-hf's LLaVA-1.5 processors.
LLAVA_TURNS = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for part in message['content'] %}{{ part['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# LLaVA's conv_vicuna_v1 (the paper's template): the system line, then the same turns.
VICUNA_V1 = (
    "{{ 'A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user\\'s questions. ' }}" + LLAVA_TURNS
)

# InstructBLIP's own format (LAVIS): the instruction as is, the answer after a space, then </s>.
PLAIN = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% else %} {% for part in message['content'] %}{{ part['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
)
