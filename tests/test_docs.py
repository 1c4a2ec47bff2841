"""The README and docs/ say what the code does: their runnable code blocks run, their outputs are the real ones.

Convention: a fenced block is run when its info string says `runnable` after the language:

* ```` ```python runnable ````: executed as it stands, in a fresh namespace, in an empty temporary folder
  (so what it writes lands there);
* ```` ```bash runnable ````: every line is a `lorakit ...` command (`\\` continues a line, `#` starts a
  comment), run through `lorakit.cli.main`, and must exit 0;
* ```` ```console runnable ````: lines starting with `$ lorakit ` are commands; the lines after one, up to the
  next, are what it prints (stdout, then stderr), compared line by line with trailing spaces dropped. A line
  starting with `...` in the expected output stands for any number of lines.

Only blocks that run offline, on bundled configs or the installed test models (MiniLM), in seconds, are
marked; blocks that need a GPU, the Hub, data files or a large model stay plain. Besides, the README stays a
front page (at most 300 lines), its relative links and those of docs/ point at files that exist, and the
JSON schema in docs/report.md has the keys the real output has.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from lorakit.cli import main

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\S*)(.*)$")


def blocks(path: Path) -> list[tuple[int, str, list[str], str]]:
    """(line number, language, info words, code) of each fenced block of a Markdown file."""
    found, lines, start = [], path.read_text().splitlines(), None
    for number, line in enumerate(lines, 1):
        match = FENCE.match(line)
        if not match:
            continue
        if start is None:
            start, language, words = number, match.group(1), match.group(2).split()
        else:
            found.append((start, language, words, "\n".join(lines[start:number - 1])))
            start = None
    assert start is None, f"{path.name}: the block opened on line {start} is never closed"
    return found


RUNNABLE = [pytest.param(path, line, language, code, id=f"{path.relative_to(ROOT)}:{line}")
            for path in PAGES for line, language, words, code in blocks(path) if "runnable" in words]


def test_the_marked_blocks_are_found_and_of_a_kind_that_runs():
    kinds = {language for _, _, language, _ in (p.values for p in RUNNABLE)}
    assert kinds <= {"python", "bash", "console"}, kinds
    assert {"python", "console"} <= kinds and len(RUNNABLE) >= 5  # the convention is in use, not lost


def commands(code: str) -> list[list[str]]:
    return [shlex.split(line, comments=True) for line in code.replace("\\\n", " ").splitlines()
            if shlex.split(line, comments=True)]


def run(argv: list[str], capsys) -> tuple[int, str]:
    assert argv[0] == "lorakit", f"not a lorakit command: {argv}"
    status = main(argv[1:])
    out = capsys.readouterr()
    return status, out.out + out.err


def matches(expected: list[str], actual: list[str]) -> bool:
    """Line by line; an expected line starting with '...' takes any number of actual lines."""
    if not expected:
        return not actual
    if expected[0].startswith("..."):
        return any(matches(expected[1:], actual[k:]) for k in range(len(actual) + 1))
    return bool(actual) and expected[0] == actual[0] and matches(expected[1:], actual[1:])


@pytest.mark.parametrize("path,line,language,code", RUNNABLE)
def test_the_block_runs(path, line, language, code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if language == "python":
        exec(compile(code, f"{path.name}:{line}", "exec"), {"__name__": "__docs__"})
    elif language == "bash":
        for argv in commands(code):
            status, printed = run(argv, capsys)
            assert status == 0, f"{' '.join(argv)} exited {status}:\n{printed}"
    else:
        parts = re.split(r"^\$ (.*)$", code, flags=re.M)
        assert parts[0].strip() == "", "a console block starts with a `$ lorakit ...` line"
        for command, expected in zip(parts[1::2], parts[2::2]):
            status, printed = run(shlex.split(command), capsys)
            want = [x.rstrip() for x in expected.strip("\n").splitlines()]
            got = [x.rstrip() for x in printed.rstrip("\n").splitlines()]
            assert status == 0 or want[:1] and want[0].startswith("error:"), printed
            assert matches(want, got), f"$ {command}\nprinted:\n{printed}"


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = next(code for _, language, _, code in blocks(ROOT / "README.md") if "pytest" in code)
    assert test_command.strip() in ci, ".ci/run runs the README's test command, exactly"


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_relative_links_point_at_files_and_headings_that_exist():
    missing = []
    for path in PAGES:
        text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            page = path.parent / target if target else path
            if not page.exists():
                missing.append(f"{path.relative_to(ROOT)} -> {target}")
            elif anchor and page.suffix == ".md" and anchor not in anchors(page):
                missing.append(f"{path.relative_to(ROOT)} -> {target}#{anchor}")
    assert missing == []


def test_the_documented_json_schema_has_the_real_keys(capsys):
    code = next(code for _, language, _, code in blocks(ROOT / "docs" / "report.md") if language == "json")
    documented = json.loads(code.replace("{...}", "{}").replace(", ...]", "]").replace("...", "null"))
    assert main(["compare-parameters", "bert-base-uncased", "--task", "seq-cls", "--format", "json"]) == 0
    real = json.loads(capsys.readouterr().out)

    def same_keys(doc, out, where="$"):
        if isinstance(doc, dict) and doc:  # {} stands for an object whose keys are not listed
            assert isinstance(out, dict) and set(out) == set(doc), f"{where}: {sorted(set(out) ^ set(doc))}"
            for key in doc:
                same_keys(doc[key], out[key], f"{where}.{key}")
        elif isinstance(doc, list) and doc:
            assert isinstance(out, list) and out, where
            same_keys(doc[0], out[0], f"{where}[0]")

    same_keys(documented, real)
    assert real["model"] == documented["model"] and real["total_parameters"] == documented["total_parameters"]
