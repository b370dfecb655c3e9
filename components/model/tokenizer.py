"""The embedded tiny base's tokenizer and chat templates.

No tokenizer can be downloaded here, so the tiny base trains its own byte-level BPE on the very
corpus it will read (instructions, answers, captions of the data dir). Byte-level means nothing is
ever out of vocabulary, so a held-out instruction with unseen words still tokenizes.

The chat templates take LLaVA-style messages (content = a string or a list of {"type": "image"} /
{"type": "text", "text": ...} parts) so the same conversation renders for the tiny base, a composed
model and a real llava-hf checkpoint (whose processor brings its own template).
"""

from __future__ import annotations

from typing import Iterable

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}

# vicuna_v1 as LLaVA stage one uses it (system prompt dropped: it would only lengthen every sequence
# of a tiny model). Prompt = "USER: <image>\n{instruction} ASSISTANT:", completion = " {answer}</s>".
VICUNA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# ChatML with an image slot, for composed models whose LM is ChatML-instruct (e.g. SmolLM2).
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `texts`, with <image> as a special token.

    BOS is prepended by the tokenizer's post-processor (as Llama's does), so templates never write it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL_TOKENS[k] for k in ("unk_token", "bos_token", "eos_token", "pad_token")] + [IMAGE_TOKEN]
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=VICUNA_TEMPLATE,
        padding_side="right",
        **SPECIAL_TOKENS,
    )
    return fast


def ensure_image_token(tokenizer) -> None:
    """Make sure a pretrained LM's tokenizer (loaded with `image_token=IMAGE_TOKEN`, which registers the
    named token) holds <image> as one special token, and has a pad token for batching."""
    from transformers import AddedToken

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if getattr(tokenizer, "image_token", None) != IMAGE_TOKEN:
        raise ValueError(
            f"the LM tokenizer names {getattr(tokenizer, 'image_token', None)!r} as its image token, not {IMAGE_TOKEN!r}"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
