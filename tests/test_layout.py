"""The package's folders are its architecture: a layer imports only from layers below it.

modeling (models, prompts, sampling) < decode (speculative, guided, baselines) < training (data, trainer, TTT)
< experiments and reporting (run folders, figures) < app (CLI, server, pipeline). `errors` and
`reporting.runs` (JSON/JSONL IO of run folders) are leaves every layer may use."""

import ast
from pathlib import Path

import draftguide

PKG = Path(draftguide.__file__).parent
RANK = {"modeling": 1, "decode": 2, "training": 3, "experiments": 4, "reporting": 4, "app": 5}
LEAVES = ("draftguide.errors", "draftguide.reporting.runs")
# (importer, imported): known upward edges, each with its reason
ALLOWED = {
    # the `cltasks` prompt source of make-data builds the built-in task suite (a lazy import)
    ("training/datasources.py", "draftguide.experiments.tasks"),
}


def imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; the package imports absolutely"
            out.append((node.lineno, node.module or ""))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return out


def test_every_module_lives_in_a_layer():
    flat = sorted(p.name for p in PKG.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "errors.py"]
    assert set(p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()) == set(RANK)


def test_layers_import_only_downwards():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        layer = rel.split("/")[0]
        if layer not in RANK:
            continue
        for line, mod in imports(path):
            parts = mod.split(".")
            if parts[0] != "draftguide" or mod in LEAVES or len(parts) < 2 or parts[1] not in RANK:
                continue
            if RANK[parts[1]] > RANK[layer] and (rel, mod) not in ALLOWED:
                bad.append(f"{rel}:{line} imports {mod}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_private_names_cross_modules():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("draftguide"):
                bad += [
                    f"{path.relative_to(PKG)}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")
                ]
    assert not bad, "private helpers imported across modules:\n" + "\n".join(bad)
