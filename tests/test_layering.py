"""The import graph of edkm points one way: no module imports from a layer above its own.

Layers, bottom to top (README "Architecture"): kernels, config, offload, _checks -> functional ->
layers -> preparation, importance, export, lowrank, hub, evaluate (and the other
model-level modules) -> train -> cli. The package ``edkm/__init__.py`` is the public
façade and may import anything; nothing inside edkm may import the façade. Every
``import`` statement counts, including the lazy ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"edkm": ROOT / "edkm", "edkm.kernels": ROOT / "tkernels", "edkm.ckernels": ROOT / "ckernels"}

# First dotted prefix that matches wins; unlisted edkm modules are model-level (rank 3).
RANKS = [
    ("edkm.kernels", 0), ("edkm.ckernels", 0), ("edkm.config", 0), ("edkm.offload", 0), ("edkm._checks", 0),
    ("edkm.functional", 1),
    ("edkm.layers", 2),
    ("edkm.train", 4),
    ("edkm.cli", 5), ("edkm.__main__", 5),
]
MODEL_LEVEL = 3
FACADE = 6


def _rank(module: str) -> int:
    if module == "edkm":
        return FACADE
    for prefix, rank in RANKS:
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return MODEL_LEVEL


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, base in PACKAGE_DIRS.items():
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, edkm module) of every edkm import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "edkm"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "edkm":
            for a in node.names:  # `from edkm import functional` names a module; `from edkm import prepare` the façade
                sub = f"{node.module}.{a.name}"
                found.append((node.lineno, sub if sub in modules else node.module))
    return found


def test_no_import_points_up():
    modules = _modules()
    assert "edkm.functional.table" in modules and "edkm.kernels.patterns" in modules, sorted(modules)[:10]
    bad = []
    for name, path in modules.items():
        if name == "edkm":
            continue
        for line, target in _imports(path, modules):
            if _rank(target) > _rank(name):
                bad.append(f"{path.relative_to(ROOT)}:{line} {name} (layer {_rank(name)}) imports {target} "
                           f"(layer {_rank(target)})")
    assert not bad, "imports pointing up:\n" + "\n".join(bad)


def test_the_check_sees_an_upward_import(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from edkm.train.loop import train\n    from edkm import prepare\n")
    got = _imports(path, _modules())
    assert got == [(2, "edkm.train.loop"), (3, "edkm")]
    assert _rank("edkm.functional.table") < _rank("edkm.train.loop") < _rank("edkm")


def test_no_top_level_directory_shadows_an_installed_package():
    """``python -m ...`` from the repository root puts the root first on sys.path, so a package
    directory there named like an installed distribution's top-level module hides it (the
    Triton kernels lived in ``kernels/`` until transformers 5.25 came to require Hugging Face's
    ``kernels`` package and imported ours instead)."""
    from importlib.metadata import packages_distributions

    installed = packages_distributions()
    ours = {"edkm"}
    clashes = [p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name not in ours
               and p.name in installed]
    assert not clashes, f"{clashes} would shadow the installed {[installed[c] for c in clashes]}"
