"""QLoRA for causal LM, the way users load it: a checkpoint loaded in 4 bits, LoRA, train, then generate.

    python examples/causal_lm_4bit.py            # 120 steps
    python examples/causal_lm_4bit.py --quick    # 40 steps
    python examples/causal_lm_4bit.py --bnb      # quantized by transformers' BitsAndBytesConfig instead

No pretrained causal LM is at hand offline on our machines, so this saves a tiny Llama built from a config
(random weights) as a checkpoint, with a word-level tokenizer, loads it quantized and teaches it a few
sentences. The code is the same for a real checkpoint: replace the folder with "meta-llama/Llama-3.1-8B" and
the tokenizer with its own.
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


def train_and_generate(output_dir: str, steps: int = 120, bnb: bool = False) -> str:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import lorakit

    tokenizer = word_tokenizer(TEXT)
    checkpoint = os.path.join(output_dir, "tiny-llama")
    tiny_llama(len(tokenizer)).save_pretrained(checkpoint)
    if bnb:  # as peft's and TRL's docs load a model for QLoRA
        model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
    else:  # nf4 with double quantization, the layers that must stay in full precision kept so
        model = lorakit.load(checkpoint, quant="4bit")
    data = lorakit.causal_lm_data(datasets.Dataset.from_dict({"text": TEXT}), tokenizer, max_length=16)
    args = lorakit.training_args(os.path.join(output_dir, "run"), max_steps=steps, per_device_train_batch_size=8,
                                 learning_rate=1e-2, save_strategy="no", eval_strategy="no", logging_steps=20,
                                 seed=0, disable_tqdm=True)
    trainer = lorakit.LoraTrainer(model=model, args=args, train_dataset=data,
                                  data_collator=lorakit.collator(tokenizer, "causal-lm"),
                                  lora=lorakit.Lora(r=8, alpha=16, targets="all-linear"))
    trainer.train()
    trainer.save_model(os.path.join(output_dir, "adapter"))
    merged = lorakit.merge(checkpoint, os.path.join(output_dir, "adapter"), os.path.join(output_dir, "merged"))
    print(f"merged onto the full-precision checkpoint: max |logit difference| "
          f"{merged['verification']['max_abs_logit_difference']:.1e} against the adapter through peft")
    model = trainer.model.eval()
    prompt = tokenizer("the drug worked", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 steps instead of 120")
    parser.add_argument("--bnb", action="store_true", help="load with transformers' BitsAndBytesConfig")
    options = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        print(train_and_generate(tmp, steps=40 if options.quick else 120, bnb=options.bnb))
