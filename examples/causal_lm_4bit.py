"""LoRA on a 4-bit base for causal LM: train, then generate.

    python examples/causal_lm_4bit.py

No pretrained causal LM is at hand offline on our machines, so this builds a
tiny Llama from a config (random weights) and a word-level tokenizer, and
teaches it a few sentences. The code is the same for a real checkpoint:
replace `tiny_llama()` with `lorakit.load("meta-llama/Llama-3.1-8B", task="causal-lm")`
and the tokenizer with its own.
"""

from __future__ import annotations

import os
import tempfile

TEXT = [
    "the patient took the drug and the pain went away",
    "the drug worked well with no side effects",
    "the side effects were bad and the pain stayed",
] * 16


def word_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.split()})
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>")


def tiny_llama(vocab_size: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, bos_token_id=1, eos_token_id=1,
                         pad_token_id=1)
    return LlamaForCausalLM(config)


def train_and_generate(output_dir: str, steps: int = 120) -> str:
    import datasets

    import lorakit

    tokenizer = word_tokenizer(TEXT)
    data = lorakit.causal_lm_data(datasets.Dataset.from_dict({"text": TEXT}), tokenizer, max_length=16)
    args = lorakit.training_args(output_dir, max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-2,
                                 save_strategy="no", eval_strategy="no", logging_steps=20, seed=0,
                                 disable_tqdm=True)
    trainer = lorakit.LoraTrainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=data,
                                  data_collator=lorakit.collator(tokenizer, "causal-lm"),
                                  lora=lorakit.Lora(r=8, alpha=16, targets="all-linear"), quant="4bit")
    trainer.train()
    model = trainer.model.eval()
    prompt = tokenizer("the drug worked", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        print(train_and_generate(tmp))
