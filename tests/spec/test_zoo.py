"""Every preset in adapters_zoo/presets is valid against the schema, and every module it names exists in a
tiny model of each family it covers. A preset with an unknown or mistyped key is refused, naming file and key."""

from __future__ import annotations

import fnmatch

import pytest
import torch
from conftest import BUILDERS, FAMILIES, build, build_family

from lorakit.core.errors import SpecError
from lorakit.spec.names import suffix_match
from lorakit.spec.zoo import block_of, find_block_lists, presets, read_preset

MODEL_TYPES = {arch: getattr(getattr(build(arch), "config", None), "model_type", None) for arch in BUILDERS}
MODEL_TYPES.update({f"hub:{name}": row["model_type"] for name, row in FAMILIES.items()})
COVERED = [(name, arch) for name, preset in presets().items() for arch, model_type in MODEL_TYPES.items()
           if model_type in preset.model_types]


def build_any(arch: str):
    return build_family(arch.removeprefix("hub:")) if arch.startswith("hub:") else build(arch)


def test_every_family_in_the_test_models_has_a_preset():
    covered = {arch for _, arch in COVERED}
    assert covered >= {"bert", "roberta", "distilbert", "gpt2", "llama", "mistral", "qwen2", "t5", "vit"}


@pytest.mark.parametrize("preset_name,arch", COVERED)
def test_preset_names_modules_that_exist(preset_name, arch):
    preset = presets()[preset_name]
    model = build_any(arch)
    names = [n for n, _ in model.named_modules() if n]
    stacks = find_block_lists(model, preset)
    assert stacks and all(isinstance(dict(model.named_modules())[s], torch.nn.ModuleList) for s in stacks)
    if preset.embeddings:  # alternatives across a family (a VLM's embed_tokens / embeddings): at least one here
        assert any(suffix_match(n, e) for n in names for e in preset.embeddings), f"{preset_name}: no embedding"
    relative = {where[2] for n in names if (where := block_of(n, stacks))} | set(names)  # or full-name globs
    for group, globs in preset.groups.items():  # alternatives for variants (T5's wi / gated wi_0, wi_1)
        assert any(fnmatch.fnmatchcase(r, g) for r in relative for g in globs), f"{preset_name}.{group} matches nothing"


@pytest.mark.parametrize("preset_name", sorted({name for name, _ in COVERED}))
def test_every_embedding_a_preset_names_exists_in_one_of_its_families(preset_name):
    preset = presets()[preset_name]
    names = {n for name, arch in COVERED if name == preset_name for n, _ in build_any(arch).named_modules() if n}
    for embedding in preset.embeddings:
        assert any(suffix_match(n, embedding) for n in names), f"{preset_name}: no module {embedding!r} in its family"


def test_every_module_rule_holds_somewhere_in_the_hub():
    from lorakit.spec.zoo import module_rules, ruled_modules

    held = {id(rule) for name in FAMILIES for rule in ruled_modules(build_family(name)).values()}
    assert [rule for rule in module_rules() if id(rule) not in held] == []  # a rule no family exercises is untested


@pytest.mark.parametrize("text,complaint", [
    ('model_types = ["x"]\nranks = 3\n', "unknown key 'ranks'"),
    ('model_types = "x"\n', "model_types must be a list of strings"),
    ('[recommended]\nr = 8\nlr = 1e-4\n', "unknown key 'lr' in [recommended]"),
    ('[recommended]\nr = "eight"\n', "[recommended] r has the wrong type"),
    ('model_types = [\n', "not valid TOML"),
])
def test_bad_preset_is_refused_naming_file_and_key(tmp_path, text, complaint):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(SpecError) as caught:
        read_preset(path)
    assert complaint in str(caught.value) and "mine.toml" in str(caught.value)
