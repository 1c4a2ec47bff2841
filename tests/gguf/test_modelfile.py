"""The Ollama Modelfile beside a GGUF file: its Go template, run the way Ollama runs it, writes what transformers'
apply_chat_template writes for the same conversation. Ollama cannot run here, so this file carries its own reading
of the few Go template constructs and Modelfile commands involved (from Go's text/template and Ollama's
parser/parser.go, template/template.go and server/routes.go), independent of lorakit's. Chat templates: SmolLM2's
own, and the real Jinja templates of other families (tests/chat_templates.json) on tiny tokenizers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import lorakit
from lorakit.gguf.modelfile import modelfile

TEMPLATES = json.loads((Path(__file__).parent / "chat_templates.json").read_text())

# Ollama's own test conversations (template/testdata: user, user-assistant-user, system-user-assistant-user), and
# one with a newline inside a message
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello, how are you?"}],
    "user-assistant-user": [{"role": "user", "content": "Hello, how are you?"},
                            {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
                            {"role": "user", "content": "I'd like to show off how chat templating works!"}],
    "system-user-assistant-user": [{"role": "system", "content": "You are a helpful assistant."},
                                   {"role": "user", "content": "Hello, how are you?"},
                                   {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
                                   {"role": "user", "content": "I'd like to show off\nhow chat templating works!"}],
}


# ---- Ollama, as far as these Modelfiles need it ---------------------------------------------------------

def parse_modelfile(text: str) -> dict:
    """Commands of a Modelfile: '#' comments, COMMAND value, values in "..." or \"\"\"...\"\"\" (several lines)."""
    commands, rest = {"stop": []}, text
    while rest := rest.lstrip():
        if rest.startswith("#"):
            rest = rest.partition("\n")[2]
            continue
        name, _, rest = rest.partition(" ")
        if name == "PARAMETER":
            name, _, rest = rest.partition(" ")
        for quote in ('"""', '"'):
            if rest.startswith(quote):
                end = rest.index(quote, len(quote))
                value, rest = rest[len(quote):end], rest[end + len(quote):]
                break
        else:
            value, _, rest = rest.partition("\n")
        if name == "stop":
            commands["stop"].append(value)
        else:
            commands[name] = value
    return commands


TOKEN = re.compile(r'\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+')


def go_eval(expr: list, scope: dict):
    """One pipeline of text/template: a value (.Field, $.Field, $var, "string", 123) or a function call
    (eq, ne, and, or, not) on arguments, with parenthesised sub-pipelines."""
    def value(tokens: list):
        token = tokens.pop(0)
        if token == "(":
            inner = []
            depth = 1
            while depth:
                t = tokens.pop(0)
                depth += {"(": 1, ")": -1}.get(t, 0)
                if depth:
                    inner.append(t)
            return go_eval(inner, scope)
        if token.startswith('"'):
            return json.loads(token)
        if token.isdigit():
            return int(token)
        if token.startswith("$."):
            return scope["$"][token[2:]]
        if token.startswith("$"):
            return scope[token]
        if token.startswith("."):
            return scope["."][token[1:]]
        functions = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "not": lambda a: not a,
                     "and": lambda a, b: b if a else a, "or": lambda a, b: a if a else b}
        arguments = []
        while tokens:
            arguments.append(value(tokens))
        return functions[token](*arguments)
    return value(list(expr))


def go_parse(template: str) -> list:
    """Text and {{ actions }} into a tree of ("text", s), ("print", expr), ("if", [(cond, body)], else_body),
    ("range", var_index, var_value, expr, body); {{- and -}} trim the whitespace beside them."""
    pieces = re.split(r"({{-?\s.*?\s-?}})", template, flags=re.S)
    for i, piece in enumerate(pieces):
        if piece.startswith("{{- "):
            pieces[i - 1] = pieces[i - 1].rstrip()
        if piece.endswith(" -}}") and i + 1 < len(pieces):
            pieces[i + 1] = pieces[i + 1].lstrip()

    def block(position: int) -> tuple[list, int, str]:
        nodes = []
        while position < len(pieces):
            piece = pieces[position]
            position += 1
            if not piece.startswith("{{"):
                nodes.append(("text", piece))
                continue
            words = TOKEN.findall(piece.strip("{}-").strip())
            if words[0] in ("end", "else"):
                return nodes, position, " ".join(words)
            if words[0] == "if":
                branches, otherwise, cond = [], [], words[1:]
                while True:
                    body, position, closer = block(position)
                    branches.append((cond, body))
                    if closer.startswith("else if"):
                        cond = TOKEN.findall(closer)[2:]
                    elif closer == "else":
                        otherwise, position, _ = block(position)
                        break
                    else:
                        break
                nodes.append(("if", branches, otherwise))
            elif words[0] == "range":
                assert words[1].endswith(",") and words[3] == ":=", words  # range $i, $m := PIPELINE
                body, position, _ = block(position)
                nodes.append(("range", words[1][:-1], words[2], words[4:], body))
            else:
                nodes.append(("print", words))
        return nodes, position, ""
    return block(0)[0]


def go_run(nodes: list, scope: dict) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "print":
            out.append(str(go_eval(node[1], scope)))
        elif node[0] == "if":
            for cond, body in node[1]:
                if go_eval(cond, scope):
                    out.append(go_run(body, scope))
                    break
            else:
                out.append(go_run(node[2], scope))
        else:
            _, index, item, expr, body = node
            for i, element in enumerate(go_eval(expr, scope)):
                out.append(go_run(body, {**scope, ".": element, index: i, item: element}))
    return "".join(out)


def ollama_prompt(commands: dict, conversation: list[dict]) -> str:
    """What Ollama's chat endpoint gives the model: the Modelfile's SYSTEM first when the request has no system
    message (routes.go), .System = the system messages joined by blank lines (template.go's collate)."""
    messages = list(conversation)
    if messages[0]["role"] != "system" and commands.get("SYSTEM"):
        messages.insert(0, {"role": "system", "content": commands["SYSTEM"]})
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages], "System": system}
    return go_run(go_parse(commands["TEMPLATE"]), {"$": data, ".": data})


# ---- the checks -------------------------------------------------------------------------------------------

def tiny_tokenizer(folder: Path, family: str) -> Path:
    """A word-level tokenizer holding the family's special tokens, BOS added on encode where the family's is,
    and the family's real chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    entry = TEMPLATES[family]
    specials = [t for t in (entry["bos_token"], entry["eos_token"]) if t]
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, **{t: i + 2 for i, t in enumerate(specials)}},
                                           unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if entry["adds_bos"]:
        bos = entry["bos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                                 special_tokens=[(bos, 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=entry["bos_token"],
                                   eos_token=entry["eos_token"], unk_token="[UNK]")
    fast.chat_template = entry["chat_template"]
    fast.save_pretrained(folder)
    return folder


def check_against_transformers(folder: Path, tokenizer) -> tuple[dict, int]:
    """Each conversation through the Modelfile's template (Ollama) and through apply_chat_template (transformers)
    gives the same text, up to the BOS llama.cpp puts first where the tokenizer adds one. Returns the Modelfile's
    commands and how many conversations the HF template accepted."""
    commands = parse_modelfile(modelfile(folder, "model.gguf")[0])
    assert commands["FROM"] == "./model.gguf" and commands["stop"]
    adds_bos = tokenizer.bos_token is not None and tokenizer("hello")["input_ids"][0] == tokenizer.bos_token_id
    compared = 0
    for name, conversation in CONVERSATIONS.items():
        try:
            expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - the template refuses this conversation (Gemma 2: no system role)
            continue
        compared += 1
        assert (tokenizer.bos_token if adds_bos else "") + ollama_prompt(commands, conversation) == expected, name
    return commands, compared


def test_smollm2_modelfile_writes_what_its_chat_template_writes(smollm2):
    commands, compared = check_against_transformers(Path(smollm2.folder), smollm2.tokenizer)
    assert compared == 3
    # SmolLM2's template adds its own system prompt when a conversation has none: Ollama's SYSTEM does that
    assert commands["SYSTEM"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert set(commands["stop"]) == {"<|im_start|>", "<|im_end|>"}


# family -> (stop words Ollama ships for that format, in template/<name>.json; SYSTEM; conversations compared)
EXPECTED = {
    "chatml": ({"<|im_start|>", "<|im_end|>"}, None, 3),
    "chatml-default-system": ({"<|im_start|>", "<|im_end|>"}, "You are a helpful assistant", 3),
    "llama3": ({"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}, None, 3),
    "llama3.1": ({"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}, None, 3),  # a system turn always
    "gemma": ({"<start_of_turn>", "<end_of_turn>"}, None, 2),  # Gemma 2 refuses system messages
    "gemma3": ({"<start_of_turn>", "<end_of_turn>"}, None, 3),
    "phi3": ({"<|end|>", "<|system|>", "<|user|>", "<|assistant|>"}, None, 3),
}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_each_family_modelfile_writes_what_its_chat_template_writes(family, tmp_path):
    from transformers import AutoTokenizer

    folder = tiny_tokenizer(tmp_path, family)
    commands, compared = check_against_transformers(folder, AutoTokenizer.from_pretrained(folder))
    stops, system, conversations = EXPECTED[family]
    assert (set(commands["stop"]), commands.get("SYSTEM"), compared) == (stops, system, conversations)


def test_a_template_of_no_known_format_is_refused_and_none_gives_no_template(tmp_path):
    with pytest.raises(lorakit.LorakitError, match="cannot turn into Ollama's template.*begins '\\[INST\\]"):
        modelfile(tiny_tokenizer(tmp_path / "mistral", "mistral"), "model.gguf")
    from transformers import AutoTokenizer

    folder = tiny_tokenizer(tmp_path / "plain", "chatml")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = None
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer.save_pretrained(folder)
    text, info = modelfile(folder, "model.gguf")
    assert parse_modelfile(text) == {"stop": [], "FROM": "./model.gguf"} and info["template"] is None


def test_merge_writes_the_modelfile_beside_the_gguf_and_never_over_one(smollm2, tmp_path, capsys):
    import shutil

    from gguf_models import tiny_family

    from lorakit.cli import main

    base, adapter = tiny_family("llama-3", tmp_path)
    with pytest.raises(lorakit.LorakitError, match="goes beside a GGUF file"):
        lorakit.merge(base, adapter, tmp_path / "merged", ollama=True)
    (tmp_path / "Modelfile").write_text("mine")
    with pytest.raises(lorakit.LorakitError, match="Modelfile already exists"):
        lorakit.merge(base, adapter, tmp_path / "merged", gguf=tmp_path / "m.gguf", ollama=True)
    assert (tmp_path / "Modelfile").read_text() == "mine"
    argv = ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "merged"), "--gguf",
            str(tmp_path / "m.gguf"), "--ollama", "--force", "--no-verify"]
    assert main(argv) == 0
    assert f"wrote {tmp_path / 'Modelfile'} (no chat template" in capsys.readouterr().out  # the tiny base has none
    assert parse_modelfile((tmp_path / "Modelfile").read_text()) == {"stop": [], "FROM": "./m.gguf"}
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["gguf"]["modelfile"]["path"] == str(tmp_path / "Modelfile")

    # a base whose tokenizer llama.cpp knows (SmolLM2's) but whose chat template is of no known format: refused
    # before any weight is merged
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(smollm2.folder) / name, base / name)
    (base / "chat_template.jinja").write_text(TEMPLATES["mistral"]["chat_template"])
    with pytest.raises(lorakit.LorakitError, match="cannot turn into Ollama's template"):
        lorakit.merge(base, adapter, tmp_path / "again", gguf=tmp_path / "merged" / "again.gguf", ollama=True)
    assert not (tmp_path / "again").exists() and not (tmp_path / "merged" / "again.gguf").exists()
