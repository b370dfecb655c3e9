"""dvc.yaml's code deps come from what each stage's command imports.

For every stage, the module imports of its `mrt <stage>` command (the function in flows/cli.py,
plus the cli helpers it calls) are followed through `components` and `flows` — every import in each
reached module, at module level or inside a function, so the set is a superset of what can run. Every
file reached must be covered by a dep of that stage in dvc.yaml (the file itself or a folder above
it); otherwise DVC would not rerun the stage after an edit to that file, and neither would `mrt run`.

A package's `__init__.py` that holds only a docstring is not a dep (nothing in it can run).
Not followed: the command-line shell every command shares — flows/cli.py (argument parsing),
components/core/config.py (params parsing; every value it reads is a DVC param of the stage),
components/core/offline.py (environment switches) and the package's __init__ (its version string).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("components", "flows")
SHELL = {"flows/cli.py", "components/core/config.py", "components/core/offline.py", "components/__init__.py",
         "flows/__init__.py"}


def module_file(root: Path, name: str) -> Path | None:
    p = root.joinpath(*name.split("."))
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py")
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    return None


def imports_in(node: ast.AST, module: str, root: Path) -> set[str]:
    """Dotted names of project modules imported anywhere under `node` (`from x import y` adds x.y
    when y is a module)."""
    found: set[str] = set()
    is_pkg = (module_file(root, module) or Path()).name == "__init__.py"
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            found |= {a.name for a in n.names if a.name.split(".")[0] in PACKAGES}
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = module.split(".")
                base = base[: len(base) - n.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([n.module] if n.module else []))
            else:
                mod = n.module or ""
            if mod.split(".")[0] not in PACKAGES:
                continue
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in n.names if module_file(root, f"{mod}.{a.name}")}
    return found


def docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def closure(start: set[str], root: Path) -> set[str]:
    """Files (relative, posix) of every project module reachable from `start` (parent packages too)."""
    seen: set[str] = set()
    todo = list(start)
    while todo:
        mod = todo.pop()
        parts = mod.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        if mod in seen:
            continue
        path = module_file(root, mod)
        if path is None:
            continue
        seen.add(mod)
        todo += imports_in(ast.parse(path.read_text(encoding="utf-8")), mod, root)
    files = [module_file(root, m) for m in seen]
    return {f.relative_to(root).as_posix() for f in files if not (f.name == "__init__.py" and docstring_only(f))}


@functools.lru_cache(maxsize=4)
def command_imports(root: Path = ROOT) -> dict[str, frozenset[str]]:
    """{command name: files its code can import}, from flows/cli.py's `<name>_cmd` functions and
    the module-level cli helpers they call."""
    tree = ast.parse((root / "flows" / "cli.py").read_text(encoding="utf-8"))
    helpers = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    out = {}
    for fn in tree.body:
        if not (isinstance(fn, ast.FunctionDef) and fn.name.endswith("_cmd")):
            continue
        mods = imports_in(fn, "flows.cli", root)
        called = {n.func.id for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        for name in called & set(helpers) - {fn.name}:
            mods |= imports_in(helpers[name], "flows.cli", root)
        out[fn.name.removesuffix("_cmd")] = frozenset(closure(mods, root) - SHELL)
    return out


def missing_deps(dvc_yaml: dict, root: Path = ROOT) -> dict[str, list[str]]:
    """{stage: imported files no dep of the stage covers} for every stage whose command is `mrt <x>`."""
    imports = command_imports(root)
    missing = {}
    for name, spec in (dvc_yaml.get("stages") or {}).items():
        cmd = str(spec.get("cmd", "")).split()
        assert cmd[:1] == ["mrt"] and len(cmd) >= 2, f"dvc.yaml stage {name!r}: cmd {spec.get('cmd')!r} is not `mrt <x>`"
        deps = [str(d).rstrip("/") for d in spec.get("deps") or [] if "${" not in str(d)]
        lost = sorted(f for f in imports[cmd[1]] if not any(f == d or f.startswith(d + "/") for d in deps))
        if lost:
            missing[name] = lost
    return missing


def _dvc() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))


def test_walker_follows_function_level_imports_into_the_project():
    imports = command_imports()
    assert "components/train/training.py" in imports["train"]
    assert "components/data/batching.py" in imports["train"]  # imported by training, not by the command
    assert "components/evaluation/benchmark.py" in imports["benchmark"]
    assert {"components/editors/hooks.py", "components/model/backbone.py"} <= imports["benchmark"]
    assert "components/track/registry.py" in imports["promote"] and "components/track/registry.py" not in imports["train"]
    assert "flows/ray_runner.py" in imports["ablate"]  # ablate.executor: ray
    assert not imports["data"] & {"components/train/training.py", "flows/cli.py"}


def test_every_stage_lists_every_module_its_command_imports():
    missing = missing_deps(_dvc())
    assert missing == {}, "dvc.yaml misses code deps (stage: files its command imports):\n" + "\n".join(
        f"  {stage}: {', '.join(files)}" for stage, files in missing.items())


@pytest.mark.parametrize(("stage", "dep"), [("train", "components/editors"), ("benchmark", "components/data/batching.py"),
                                             ("promote", "components/track")])
def test_a_dropped_dep_is_reported(stage, dep):
    doc = _dvc()
    doc["stages"][stage]["deps"] = [d for d in doc["stages"][stage]["deps"] if d != dep]
    missing = missing_deps(doc)
    assert stage in missing and any(f == dep or f.startswith(dep + "/") for f in missing[stage])
