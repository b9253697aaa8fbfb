"""The package's layers hold: a module imports only from its own layer or the ones below it.

core (types, config, registry, io, prompts, hub, bpe, data formats) ← encoders, index, mllm, identifiers ← stages
← pipeline, eval ← training ← world, serve, cli (and the demo). Every import counts, lazy ones and those under
``TYPE_CHECKING`` too: a function-level import of a higher layer is still a dependency.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "genret"
LAYERS = {
    0: ("__init__", "types", "config", "registry", "_io", "_swap", "_inputs", "prompts", "_hub", "bpe", "data"),
    1: ("encoders", "index", "mllm", "identifiers"),
    2: ("stages",),
    3: ("pipeline", "eval"),
    4: ("training",),
    5: ("world", "serve", "cli"),
}
LEVEL = {name: level for level, names in LAYERS.items() for name in names}


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "genret":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def _modules():
    return sorted(p for p in ROOT.rglob("*.py"))


def test_every_top_level_module_has_a_layer():
    found = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in _modules()}
    assert not found - set(LEVEL), f"place these in a layer of tests/test_layers.py: {sorted(found - set(LEVEL))}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_higher_layer(path):
    here = LEVEL[path.relative_to(ROOT).parts[0].removesuffix(".py")]
    wrong = [f"line {line}: {module} (layer {LEVEL.get(_part(module))})" for line, module in _imports(path)
             if _part(module) in LEVEL and LEVEL[_part(module)] > here]
    assert not wrong, f"{path.relative_to(ROOT.parent)} (layer {here}) imports upwards: " + "; ".join(wrong)


def test_the_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from genret.training.rerank import train_rerank\n")
    assert [m for _, m in _imports(bad)] == ["genret.training.rerank"] and LEVEL[_part("genret.training.rerank")] == 4


def test_the_readme_package_map_names_every_folder_and_only_folders_that_exist():
    import re

    readme = (ROOT.parent / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Package map", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(genret/[\w/.]*)`", table))
    folders = {f"genret/{p.name}/" for p in ROOT.iterdir() if p.is_dir() and any(p.glob("*.py"))}
    assert folders <= named, f"add to the README's package map: {sorted(folders - named)}"
    missing = [n for n in named if not (ROOT.parent / n).exists()]
    assert not missing, f"the README's package map names what is not there: {missing}"
    training = {p.stem for p in (ROOT / "training").glob("*.py")} - {"__init__", "negatives", "mini_mllm"}
    assert all(f"`{m}" in table for m in training), "name every training module in the map"
