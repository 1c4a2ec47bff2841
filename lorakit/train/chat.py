"""Chat and instruction data: conversations rendered with the tokenizer's chat template, loss on the answers.

Rows follow TRL's conventions: a `messages` column (a list of `{"role", "content"}`, the OpenAI format), or
`prompt` / `completion` columns (strings, or lists of messages). Each row is rendered with
`tokenizer.apply_chat_template`. With `train_on="assistant"` (the default) only the assistant turns carry
labels, each with the end-of-turn token the template writes after it, so the model learns to stop.

Where the template marks assistant text with `{% generation %}`, transformers' `return_assistant_tokens_mask`
gives the spans. Most templates do not (SmolLM2's, Llama's), so otherwise each assistant span is found as TRL
finds completions: render the conversation up to that turn with the generation prompt, then through the
turn; the tokens in between are the answer.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from ..core.errors import LorakitError
from .data import check_columns, ensure_pad_token, is_processor, load_table, pack_rows

logger = logging.getLogger("lorakit")
ROLES = ("system", "developer", "user", "assistant", "tool")
TRAIN_ON = ("assistant", "all")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def chat_data(source: Any, tokenizer: Any, *, train_on: str = "assistant", max_length: int = 1024,
              pack: bool = False, messages_column: str = "messages", prompt_column: str = "prompt",
              completion_column: str = "completion", images_column: str = "images", split: str = "train") -> Any:
    """Tokenized conversations with `input_ids` and `labels` (-100 outside the trained turns).

    Rows longer than max_length are cut at the end; a row whose every trained token was cut is dropped, and
    how many rows were cut or dropped is logged. pack=True packs whole rows as `causal_lm_data` does.
    The result also trains with `trl.SFTTrainer` (it keeps a ready `labels` column as it is).

    With a vision-language model's processor in place of the tokenizer, messages may hold images as TRL
    writes them (`{"type": "image"}` parts, the images themselves in the `images` column, in order): each
    row is rendered by the processor's chat template and expanded to the model's image tokens, and keeps
    its images for `collator(processor, "image-text-to-text")`, which turns them into pixel values.
    """
    if train_on not in TRAIN_ON:
        raise LorakitError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}",
                           hint="'assistant': loss on the answers only; 'all': on every token")
    if is_processor(tokenizer):
        return _vision_chat_data(source, tokenizer, train_on, max_length, messages_column, images_column, split)
    if not getattr(tokenizer, "chat_template", None):
        raise LorakitError("the tokenizer has no chat template, so conversations cannot be rendered",
                           hint="use the instruct model's tokenizer, set tokenizer.chat_template, or train on "
                                "plain text with causal_lm_data")
    table = load_table(source, split)
    if messages_column in table.column_names:
        check_columns(table, messages_column)
        conversations = [_checked(m, i, train_on) for i, m in enumerate(table[messages_column])]
    else:
        if prompt_column not in table.column_names or completion_column not in table.column_names:
            raise LorakitError(f"the dataset has neither a {messages_column!r} column nor "
                               f"{prompt_column!r} and {completion_column!r} columns",
                               hint=f"its columns are: {', '.join(table.column_names)}; pass messages_column= "
                                    "or prompt_column=/completion_column= (e.g. completion_column='response')")
        check_columns(table, prompt_column, completion_column)
        conversations = [_checked(_as_turns(p, "user") + _as_turns(c, "assistant"), i, train_on)
                         for i, (p, c) in enumerate(zip(table[prompt_column], table[completion_column]))]
    ensure_pad_token(tokenizer)
    tokenized = [_tokenize(_text_render(tokenizer), turns, train_on, i, tokenizer.chat_template)
                 for i, turns in enumerate(conversations)]
    rows = [(t["input_ids"], t["labels"]) for t in tokenized]
    cut = [i for i, (ids, _) in enumerate(rows) if len(ids) > max_length]
    rows = [(ids[:max_length], labels[:max_length]) for ids, labels in rows]
    kept = [i for i, (_, labels) in enumerate(rows) if any(label != -100 for label in labels)]
    dropped = len(rows) - len(kept)
    if cut:
        logger.warning("%d of %d conversations were longer than max_length=%d and were cut at the end; %d of them "
                       "lost every trained token and were dropped", len(cut), len(rows), max_length, dropped)
    if not kept:
        raise LorakitError(f"every conversation lost its answers to max_length={max_length}",
                           hint="raise max_length or shorten the prompts")
    import datasets

    dataset = datasets.Dataset.from_dict({"input_ids": [rows[i][0] for i in kept],
                                          "labels": [rows[i][1] for i in kept]})
    return pack_rows(dataset, max_length) if pack else dataset


def _as_turns(value: Any, role: str) -> list:
    """A prompt or completion: a plain string becomes one turn of `role`; a list of messages stays as it is."""
    return [{"role": role, "content": value}] if isinstance(value, str) or value is None else list(value)


def _checked(turns: Any, row: int, train_on: str) -> list[dict]:
    """The row's messages as plain dicts, or a LorakitError naming the row and what is wrong."""
    hint = 'each row needs a list of {"role": ..., "content": ...} with roles ' + ", ".join(ROLES)
    if not isinstance(turns, (list, tuple)) or not turns:
        raise LorakitError(f"row {row}: messages must be a non-empty list, got {turns!r}", hint=hint)
    checked = []
    for turn in turns:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise LorakitError(f"row {row}: {turn!r} is not a message with a role and a content", hint=hint)
        if turn["role"] not in ROLES:
            raise LorakitError(f"row {row}: unknown role {turn['role']!r}", hint=hint)
        content = turn["content"]
        if (not content or isinstance(content, str) and not content.strip()) and not turn.get("tool_calls"):
            if turn["role"] == "assistant":
                raise LorakitError(f"row {row}: an assistant turn is empty, so there is no answer to learn",
                                   hint="drop the row or fill in the answer")
            if content is None:
                raise LorakitError(f"row {row}: a {turn['role']} turn has no content", hint="fill or drop the row")
        # datasets stores a list of dicts as columns, filling keys a row lacks with None: drop those again.
        checked.append({k: v for k, v in turn.items() if v is not None})
    if train_on == "assistant" and not any(t["role"] == "assistant" for t in checked):
        raise LorakitError(f"row {row}: no assistant turn, so there is no answer to learn",
                           hint="add the answer as an assistant turn, or pass train_on='all'")
    return checked


def _vision_chat_data(source: Any, processor: Any, train_on: str, max_length: int, messages_column: str,
                      images_column: str, split: str) -> Any:
    if not getattr(processor, "chat_template", None):
        raise LorakitError("the processor has no chat template, so conversations with images cannot be rendered",
                           hint="use the model's own processor, or set processor.chat_template")
    import datasets

    table = load_table(source, split)
    check_columns(table, messages_column)
    if images_column in table.column_names and table.features[images_column] != datasets.List(datasets.Image()):
        try:  # what datasets' Image feature reads: PIL images, file paths, {"bytes": ..., "path": ...}
            table = table.cast_column(images_column, datasets.List(datasets.Image()))
        except Exception as exc:  # noqa: BLE001 - datasets raises several types for values that are not images
            raise LorakitError(f"the {images_column!r} column does not hold lists of images ({exc})",
                               hint="give each row a list of PIL images, image file paths or {'bytes': ...} "
                                    "dicts, in the order of its image parts") from None
    images = table[images_column] if images_column in table.column_names else [None] * len(table)
    ensure_pad_token(processor.tokenizer)
    columns: dict[str, list] = {}
    for i, (messages, row_images) in enumerate(zip(table[messages_column], images)):
        turns = _checked(messages, i, train_on)
        row_images = _row_images(turns, row_images, i, images_column)
        fields = _tokenize(_processor_render(processor, row_images), turns, train_on, i)
        if len(fields["input_ids"]) <= max_length:  # a cut through image tokens would break the model's count
            for key, value in dict(fields, images=row_images).items():
                columns.setdefault(key, []).append(value)
    cut = len(table) - len(columns.get("input_ids", []))
    if cut:
        logger.warning("%d of %d conversations with images were longer than max_length=%d and were dropped "
                       "(cutting them could split an image's tokens)", cut, len(table), max_length)
    if cut == len(table):
        raise LorakitError(f"every conversation is longer than max_length={max_length}", hint="raise max_length")
    return datasets.Dataset.from_dict(columns)


def _row_images(turns: list[dict], images: Any, row: int, column: str) -> list:
    wanted = _image_parts(turns)
    found = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
    if len(found) != wanted:
        raise LorakitError(f"row {row}: its messages have {wanted} image parts but {column!r} holds {len(found)} "
                           "images", hint=f"give each row its images in order, in the {column!r} column")
    return found


def _processor_render(processor: Any, images: list) -> Any:
    """A render function (see `_tokenize`) through a vision-language processor: the chat template's text with
    each image expanded to the model's image tokens; the per-token fields only (no pixels, no mask)."""

    def render(turns: list[dict], row: int, add_generation_prompt: bool = False) -> dict:
        text = _render_text(processor, turns, row, add_generation_prompt)
        shown = _image_parts(turns)  # the turns so far show the row's first images (checked: _row_images)
        encoded = processor(text=[text], images=[images[:shown]] if shown else None)
        return {k: list(v[0]) for k, v in encoded.items() if k == "input_ids" or k.endswith("token_type_ids")}

    return render


def _image_parts(turns: list[dict]) -> int:
    return sum(1 for t in turns if isinstance(t["content"], list)
               for part in t["content"] if isinstance(part, dict) and part.get("type") == "image")


def _render_text(processor: Any, turns: list[dict], row: int, add_generation_prompt: bool) -> str:
    try:
        return processor.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # noqa: BLE001 - templates raise their own errors
        raise LorakitError(f"row {row}: the processor's chat template cannot render this conversation: {exc}",
                           hint="check the roles and the content parts ({'type': 'image'} / {'type': 'text'})"
                           ) from None


def _render(tokenizer: Any, turns: list[dict], row: int, **kwargs: Any) -> dict:
    try:
        return tokenizer.apply_chat_template(turns, tokenize=True, return_dict=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - templates raise their own errors (e.g. roles must alternate)
        raise LorakitError(f"row {row}: the chat template cannot render this conversation: {exc}",
                           hint="check the order of the roles; many templates need user/assistant to alternate"
                           ) from None


def _text_render(tokenizer: Any) -> Any:
    def render(turns: list[dict], row: int, **kwargs: Any) -> dict:
        return _render(tokenizer, turns, row, **kwargs)

    return render


def _tokenize(render: Any, turns: list[dict], train_on: str, row: int, template: str = "") -> dict:
    """`input_ids` and `labels` of one conversation (and the other per-token fields `render` gives).
    `render(turns, row, add_generation_prompt=...)` tokenizes a conversation through its chat template."""
    if train_on == "all":
        fields = dict(render(turns, row))
        return dict(fields, input_ids=list(fields["input_ids"]), labels=list(fields["input_ids"]))
    if _GENERATION_TAG.search(template):
        rendered = render(turns, row, return_assistant_tokens_mask=True)
        ids = list(rendered["input_ids"])
        return {"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, rendered["assistant_masks"])]}
    fields = dict(render(turns, row))
    ids = list(fields["input_ids"])
    labels = [-100] * len(ids)
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        start = _common_prefix(render(turns[:i], row, add_generation_prompt=True)["input_ids"], ids)
        through = list(render(turns[:i + 1], row)["input_ids"])
        if ids[:len(through)] != through:
            raise LorakitError(f"row {row}: the chat template renders assistant turn {i} differently when later "
                               "turns follow, so its tokens cannot be located",
                               hint="use a template that marks answers with {% generation %}, or one turn per row")
        labels[start:len(through)] = ids[start:len(through)]
    return dict(fields, input_ids=ids, labels=labels)


def _common_prefix(ids: list[int], other: list[int]) -> int:
    """How many leading tokens agree (a prompt can end differently alone, e.g. tokens merging at the seam)."""
    n = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        n += 1
    return n
