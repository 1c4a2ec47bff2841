"""The Ollama Modelfile written beside a GGUF file (`--ollama`): FROM the file, the chat template in Ollama's Go
template language, its stop words, and the system prompt the model's template puts in when a conversation has none.

A Jinja chat template is a program; it cannot be translated into a Go template in general. So lorakit recognises
it instead: the model's own template (transformers' apply_chat_template) renders probe conversations, and the text
is compared with each turn format known here: ChatML (SmolLM, Qwen), Llama 3's headers, Gemma's turns, Phi-3's
tags. Each format is written once, as the text of one turn, from which both the expected rendering and the Go
template come. What the template wraps around a system prompt (Llama 3.1's knowledge-date lines) and the prompt it
inserts when there is none (SmolLM2's) are read off the renderings and checked by rendering again. A template that
matches no format is refused before anything is written; a tokenizer without a chat template (a base model) gets
a Modelfile without TEMPLATE, as Ollama then passes prompts as they are. Stop words are those Ollama ships with the
same formats (its template/*.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import LorakitError

MODELFILE = "Modelfile"
HINT = "write the Modelfile's TEMPLATE by hand (Ollama's Go template syntax), or export without --ollama"
MARK = "\u2063lorakit-system\u2063"  # a system prompt no template changes, to find what it puts around one
PROBE_SYSTEM = "You answer in one word."
PROBE = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four."},
         {"role": "user", "content": "And 3+3?"}]


@dataclass(frozen=True)
class Format:
    name: str
    turn: str  # one message, with {role} and {content}
    generation: str  # what opens the model's reply
    stops: tuple[str, ...]
    roles: dict = field(default_factory=dict)  # role names the format writes instead ("assistant" -> "model")
    system_turn: bool = True  # False: the system prompt opens the first user message, as Gemma's templates do
    # what goes around a system prompt when the model's template refuses system messages (Gemma 2): Gemma 3's way
    system_wrap: tuple[str, str] = ("", "")

    def role(self, role: str) -> str:
        return self.roles.get(role, role)


FORMATS = (
    Format("chatml", "<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n",
           ("<|im_start|>", "<|im_end|>")),
    Format("llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
           "<|start_header_id|>assistant<|end_header_id|>\n\n", ("<|start_header_id|>", "<|end_header_id|>",
                                                                   "<|eot_id|>")),
    Format("gemma", "<start_of_turn>{role}\n{content}<end_of_turn>\n", "<start_of_turn>model\n",
           ("<start_of_turn>", "<end_of_turn>"), roles={"assistant": "model"}, system_turn=False,
           system_wrap=("", "\n\n")),
    Format("phi3", "<|{role}|>\n{content}<|end|>\n", "<|assistant|>\n", ("<|end|>", "<|system|>", "<|user|>",
                                                                          "<|assistant|>")),
)


@dataclass(frozen=True)
class Match:
    format: Format
    wrap: tuple[str, str]  # text the template puts before and after a system prompt
    system: str | None  # the default system prompt (Modelfile SYSTEM); None: none
    always_system: bool  # a system turn (wrap only) even when the conversation has no system prompt


def render(fmt: Format, messages: list[dict], wrap: tuple[str, str] = ("", "")) -> str:
    """`messages` as `fmt` writes them, ending with the opening of the model's reply."""
    out, pending = [], ""
    for message in messages:
        content = message["content"]
        if message["role"] == "system":
            if fmt.system_turn:
                out.append(fmt.turn.format(role=fmt.role("system"), content=wrap[0] + content + wrap[1]))
            else:
                pending = wrap[0] + content + wrap[1]
            continue
        if message["role"] == "user":
            content, pending = pending + content, ""
        out.append(fmt.turn.format(role=fmt.role(message["role"]), content=content))
    return "".join(out) + fmt.generation


def _between(text: str, fmt: Format, messages: list[dict]) -> str | None:
    """What `text` holds where `fmt` would put a system prompt before `messages`, or None if the rest differs."""
    before, _, after = render(fmt, [{"role": "system", "content": MARK}, *messages]).partition(MARK)
    if text.startswith(before) and text.endswith(after) and len(text) >= len(before) + len(after):
        return text[len(before):len(text) - len(after)]
    return None


def match(fmt: Format, with_system: str | None, without: str) -> Match | None:
    """Does the template's text (for PROBE with PROBE_SYSTEM, None if it refused one; for PROBE alone) follow `fmt`?"""
    wrap = fmt.system_wrap
    if with_system is not None:
        middle = _between(with_system, fmt, PROBE)
        if middle is None or middle.count(PROBE_SYSTEM) != 1:
            return None
        wrap = tuple(middle.split(PROBE_SYSTEM))
    if without == render(fmt, PROBE):
        return Match(fmt, wrap, None, False)
    middle = _between(without, fmt, PROBE)
    if middle is None or not (middle.startswith(wrap[0]) and middle.endswith(wrap[1])):
        return None
    default = middle[len(wrap[0]):len(middle) - len(wrap[1])]
    if render(fmt, [{"role": "system", "content": default}, *PROBE], wrap) != without:
        return None
    return Match(fmt, wrap, default or None, not default)


def go_template(found: Match) -> str:
    """The Go template (Ollama's `.Messages`, `.System`) that writes what `found` matched."""
    fmt, (before, after) = found.format, found.wrap
    content = "{{ .Content }}"

    def turn(role: str, text: str) -> str:
        return fmt.turn.format(role=fmt.role(role), content=text)

    head = "{{ if not .System }}" + turn("system", before + after) + "{{ end }}" if found.always_system else ""
    if fmt.system_turn:
        messages = ('{{ if eq .Role "system" }}' + turn("system", before + content + after)
                    + '{{ else if eq .Role "user" }}' + turn("user", content))
    else:  # Ollama puts the system prompt (the request's, else the Modelfile's SYSTEM) first: the next message gets it
        system = "{{ if and $.System (eq $i 1) }}" + before + "{{ $.System }}" + after + "{{ end }}"
        messages = '{{ if eq .Role "user" }}' + turn("user", system + content)
    messages += '{{ else if eq .Role "assistant" }}' + turn("assistant", content) + "{{ end }}"
    return head + "{{ range $i, $m := .Messages }}" + messages + "{{ end }}" + fmt.generation


def _apply(tokenizer: Any, messages: list[dict]) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template refusing a conversation raises what it likes (jinja's errors)
        return None


def recognise(tokenizer: Any, adds_bos: bool) -> Match | None:
    """The known format the tokenizer's chat template writes; None when it has no template. `adds_bos`: llama.cpp
    puts BOS before every prompt (the GGUF's add_bos_token), so a template's own leading BOS is left to it."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    with_system = _apply(tokenizer, [{"role": "system", "content": PROBE_SYSTEM}, *PROBE])
    without = _apply(tokenizer, PROBE)
    if without is None:
        raise LorakitError("the model's chat template fails on a plain user/assistant/user conversation",
                           hint=HINT)
    bos = tokenizer.bos_token
    if adds_bos and bos:
        with_system, without = (t[len(bos):] if t is not None and t.startswith(bos) else t
                                for t in (with_system, without))
    for fmt in FORMATS:
        found = match(fmt, with_system, without)
        if found is not None:
            return found
    raise LorakitError(f"the model's chat template writes a format lorakit cannot turn into Ollama's template "
                       f"(it knows {', '.join(f.name for f in FORMATS)}); it begins {without[:60]!r}", hint=HINT)


def _quoted(text: str) -> str:
    if '"""' in text:
        raise LorakitError('the chat template holds """, which a Modelfile cannot quote', hint=HINT)
    return f'"""{text}"""'


def modelfile(folder: Path, gguf_name: str) -> tuple[str, dict]:
    """(the Modelfile's text, what it holds, for the export report) for the merged checkpoint `folder`, whose
    GGUF file is `gguf_name` in the same folder as the Modelfile."""
    import gguf
    from transformers import AutoTokenizer

    lines = [f"# ollama create NAME -f {MODELFILE}", f"FROM ./{gguf_name}"]
    found, tokenizer = None, None
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        adds_bos = bool(gguf.SpecialVocab(folder, load_merges=False).add_special_token.get("bos"))
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        found = recognise(tokenizer, adds_bos)
    if found is None:
        return "\n".join(lines) + "\n", {"template": None,
                                         "note": "no chat template: Ollama passes prompts as they are"}
    for part in (*found.wrap, found.system or ""):
        if "{{" in part:
            raise LorakitError("the chat template's system text holds '{{', which Go templates read as an action",
                               hint=HINT)
    lines.append(f"TEMPLATE {_quoted(go_template(found))}")
    lines += [f'PARAMETER stop "{stop}"' for stop in found.format.stops]
    if found.system:
        lines.append(f"SYSTEM {_quoted(found.system)}")
    info = {"template": found.format.name, "system": found.system, "stops": list(found.format.stops)}
    if "strftime_now" in tokenizer.chat_template:  # Llama 3.2's "Today Date": Ollama's template has no clock
        info["note"] = "the template's date (strftime_now) is fixed at the day of the export"
    return "\n".join(lines) + "\n", info
