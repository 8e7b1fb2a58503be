"""The layers of src/kpipe/ hold: imports run only downwards, and a stage never imports another stage.

foundation (config, errors, io, paths, console, registry) -> data -> nn -> eval -> kaggle -> stages ->
interface (cli, launch, tools). Every `import` is read from the source, those inside functions too, so a
lazy import cannot hide an upward edge.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
RANK = {"foundation": 0, "data": 1, "nn": 2, "eval": 3, "kaggle": 4, "stages": 5, "interface": 6}
INTERFACE = {"cli", "launch", "__main__", "tools"}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:  # the package itself
        return "foundation"
    top = parts[1]
    if top in INTERFACE:
        return "interface"
    return top if top in RANK else "foundation"


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def kpipe_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported kpipe module) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "kpipe"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = package.split(".")
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "kpipe":
                continue
            for a in node.names:  # `from kpipe.nn import models` imports the module kpipe.nn.models
                sub = f"{base}.{a.name}"
                out.append(
                    (
                        node.lineno,
                        sub
                        if (SRC / sub.replace(".", "/")).with_suffix(".py").exists()
                        or (SRC / sub.replace(".", "/")).is_dir()
                        else base,
                    )
                )
    return out


def wrong_way_edges() -> list[str]:
    bad = []
    for path in sorted((SRC / "kpipe").rglob("*.py")):
        me = module_name(path)
        for line, target in kpipe_imports(path):
            a, b = layer(me), layer(target)
            where = f"{path.relative_to(SRC)}:{line}: {me} -> {target}"
            if RANK[b] > RANK[a]:
                bad.append(f"{where} (upward: {a} imports {b})")
            elif a == b == "stages" and target != "kpipe.stages" and me != "kpipe.stages":
                bad.append(f"{where} (a stage imports another stage; stages talk through files)")
    return bad


def test_imports_run_downwards() -> None:
    assert wrong_way_edges() == []


@pytest.mark.parametrize(
    "edge",
    [
        ("kpipe/stages/train.py", "from kpipe import cli"),  # the old train -> cli edge
        ("kpipe/stages/relabel.py", "from kpipe.stages import train"),  # stage -> stage
        ("kpipe/nn/dist.py", "from kpipe.stages import train"),  # library -> stage
        ("kpipe/config.py", "from kpipe.nn import models"),  # foundation -> library
    ],
)
def test_the_checker_catches_wrong_way_edges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edge: tuple[str, str]
) -> None:
    """Each edge the layering forbids, planted in a copy of the tree, is reported."""
    import shutil

    copy = tmp_path / "src"
    shutil.copytree(SRC / "kpipe", copy / "kpipe")
    target = copy / edge[0]
    target.write_text(
        target.read_text(encoding="utf-8") + f"\n\ndef _planted():\n    {edge[1]}\n", encoding="utf-8"
    )
    monkeypatch.setattr(sys.modules[__name__], "SRC", copy)
    assert any(edge[0].replace("/", ".").removesuffix(".py") in e for e in wrong_way_edges())


def test_cli_import_does_not_load_torch() -> None:
    code = "import sys, kpipe.cli; assert 'torch' not in sys.modules, 'kpipe.cli imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_only_the_interface_reads_the_command_line() -> None:
    readers = []
    for path in sorted((SRC / "kpipe").rglob("*.py")):
        if layer(module_name(path)) == "interface":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "argv"
                and getattr(node.value, "id", "") == "sys"
            ):
                readers.append(f"{path.relative_to(SRC)}:{node.lineno}")
            if (
                isinstance(node, (ast.Import, ast.ImportFrom))
                and any(a.name == "argparse" for a in node.names)
                or getattr(node, "module", None) == "argparse"
            ):
                readers.append(f"{path.relative_to(SRC)}:{node.lineno} (argparse)")
    assert readers == []
