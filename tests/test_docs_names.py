"""Every module or symbol path the README and docs/ name exists: `longrope2.<module>[.<symbol>…]`, the
room-relative paths docs/architecture.md uses (`rope.factors.ntk_factors`, `lm.losses.token_nll`), and
`src/longrope2/…` files. A restructuring that moves a function fails here until the docs follow it."""

from __future__ import annotations

import ast
import functools
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "longrope2"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMENTED = [*sorted((ROOT / "conf").rglob("*.yaml")), *sorted((ROOT / "workflow").rglob("*.smk")),
             *sorted((ROOT / "benchmarks").glob("*.py"))]

FULL = re.compile(r"(?<![\w.])longrope2(?:\.[A-Za-z_]\w*)+")
# A whole backticked dotted name (a trailing `()` allowed): `rope.factors.ntk_factors`, `toy.settings.X`.
BARE = re.compile(r"`([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\(\))?`")
FILE = re.compile(r"(?<![\w/.])(?:src/)?longrope2/[\w/]+\.(?:py|yaml)")
FILE_SUFFIXES = {"py", "yaml", "yml", "json", "md", "pt", "npy", "csv", "txt", "png", "pdf", "smk", "toml",
                 "gguf", "jsonl", "lock", "in", "sh", "rst", "tex", "safetensors", "bin"}
# Modules of the flat layout (before the subpackages): a bare `stats.holm` or `mixed.label_weights` in the
# docs is a stale path (one that starts at a config section too, `tracking.enabled`, is told apart in named_in).
FLAT_MODULES = {"scaling", "methods", "config", "artifacts", "outputs", "launch", "inputs", "corpus",
                "hf_corpus", "needle", "rows", "mixed", "fitness", "long_eval", "plots", "ruler", "longbench",
                "backends", "claims", "stats", "tables"}


def config_sections() -> set[str]:
    """Top-level keys of the composed config (`train.method`, `eval.ruler`)."""
    keys = set(re.findall(r"^([a-z_]\w*):", (ROOT / "conf" / "config.yaml").read_text(), re.M))
    return keys | {p.name for p in (ROOT / "conf").iterdir() if p.is_dir()}


def config_keys() -> set[str]:
    """Every key the config files set, at any depth (`method`, `train_set`, `c_range`)."""
    key = re.compile(r"^\s*(?:- )?([A-Za-z_]\w*):", re.M)
    return {k for p in (ROOT / "conf").rglob("*.yaml") for k in key.findall(p.read_text())}


def string_literals() -> set[str]:
    """Dotted strings the package itself defines (MLflow tags such as `longrope2.host`): names, not paths."""
    out: set[str] = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(parsed(path)):
            if isinstance(node, ast.Constant) and str(node.value).startswith("longrope2."):
                out.add(node.value)
    return out


def module_file(parts: list[str]) -> Path | None:
    path = SRC.parent.joinpath(*parts)
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def defined(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """The names a module or class body binds (defs, classes, assignments, imports, also under if / try)."""
    out: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        out[name.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out.update({(a.asname or a.name).split(".")[0]: node for a in node.names})
        elif isinstance(node, (ast.If, ast.Try)):
            for block in (node.body, node.orelse, *(h.body for h in getattr(node, "handlers", []))):
                out.update(defined(block))
    return out


@functools.cache
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def dynamic(path: Path) -> bool:
    """Whether the module can have attributes its source does not show (`from x import *`, `__getattr__`)."""
    tree = parsed(path)
    return "__getattr__" in defined(tree.body) or any(
        isinstance(n, ast.ImportFrom) and any(a.name == "*" for a in n.names) for n in ast.walk(tree))


def found_in_source(path: Path, rest: list[str]) -> bool | str:
    """`rest` read off the module's source (a class's attributes too), without importing it: True, False
    (not in the source: maybe made at import), or why not when the module only imports it from its home."""
    scope: ast.AST = parsed(path)
    for i, attr in enumerate(rest):
        names = defined(scope.body) if isinstance(scope, (ast.Module, ast.ClassDef)) else {}
        if attr not in names:
            return False
        scope = names[attr]
        internal = isinstance(scope, ast.ImportFrom) and (scope.level or (scope.module or "").startswith("longrope2"))
        if i == 0 and internal:
            return f"imported there from {'.' * scope.level}{scope.module or ''}: name its home"
    return True


def resolve(name: str) -> str | None:
    """None when `name` (`longrope2.a.b.c`) is a module followed by attributes of it, else why not: the longest
    prefix that is a module of src/longrope2, then each remaining part an attribute defined there (read off
    the source; a name the module imports from another longrope2 module is not its home). Where the source
    cannot decide (an attribute of an attribute, a module with `__getattr__` or `import *`), the module is
    imported and getattr decides."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        path = module_file(parts[:end])
        if path is not None:
            break
    else:
        return "no such module"
    rest = parts[end:]
    found = found_in_source(path, rest)
    if found is True:
        return None
    if found:
        return f"{'.'.join(parts[:end])}.{rest[0]}: {found}"
    if len(rest) == 1 and not dynamic(path):
        return f"{'.'.join(parts[:end])} has no {rest[0]!r}"
    obj = importlib.import_module(".".join(parts[:end]))
    for i, attr in enumerate(rest):
        if not hasattr(obj, attr):
            return f"{'.'.join(parts[:end + i])} has no {attr!r}"
        obj = getattr(obj, attr)
    return None


def named_in(text: str, sections: set[str], keys: set[str], tags: set[str]) -> set[str]:
    """The `longrope2.`-paths a page names, and its bare backticked paths that start at a module of the package
    (or of the flat layout). A bare path that starts at a config section too (`data`, `search`, `train`,
    `report`) is a module path only when it resolves or its second part is no config key: `data.packing.X`
    and `search.run_ga` are checked, `data.train_set.corpora` and `search.c_range` are config."""
    names = {n for n in FULL.findall(text) if n not in tags and n.rsplit(".", 1)[1] not in FILE_SUFFIXES}
    for bare in BARE.findall(text):
        first, second, last = bare.split(".")[0], bare.split(".")[1], bare.rsplit(".", 1)[1]
        if last in FILE_SUFFIXES:
            continue
        if not ((SRC / first).is_dir() or (SRC / f"{first}.py").is_file() or first in FLAT_MODULES):
            continue
        if first in sections and (second in keys or resolve(f"longrope2.{bare}") is None):
            continue
        names.add(f"longrope2.{bare}")
    return names


def test_resolver_rejects_made_up_names():
    assert resolve("longrope2.rope.factors.ntk_factors") is None
    assert resolve("longrope2.rope.factors") is None
    assert resolve("longrope2.rope.no_such_thing") is not None
    assert resolve("longrope2.rope.factors.no_such_thing") is not None
    assert resolve("longrope2.nosuchmodule") is not None
    assert resolve("longrope2.nosuchmodule.ntk_factors") is not None
    assert "imported there" in resolve("longrope2.search.run_ga")  # the stage imports it from evolution.driver
    assert resolve("longrope2.evolution.driver.run_ga") is None
    assert resolve("longrope2.core.errors.ConfigError.args") is None  # inherited: the import decides
    assert resolve("longrope2.core.errors.ConfigError.no_such_thing") is not None
    sections, keys, tags = config_sections(), config_keys(), string_literals()
    assert {"train", "search", "eval", "data", "model"} <= sections and {"method", "train_set", "c_range"} <= keys
    named = named_in("`stats.holm`, `train.method`, `rope.factors`, `toy.yaml`, `search.run_ga`,"
                     " `data.train_set.corpora`, `data.rows.decode`", sections, keys, tags)
    assert named == {"longrope2.stats.holm", "longrope2.rope.factors", "longrope2.search.run_ga"}


def test_every_module_and_symbol_the_docs_name_exists():
    sections, keys, tags = config_sections(), config_keys(), string_literals()
    unresolved = []
    for page in PAGES + COMMENTED:
        text = page.read_text()
        if page.suffix != ".md":  # code files: their comments and docstrings, checked with the full prefix only
            names = {n for n in FULL.findall(text) if n not in tags and n.rsplit(".", 1)[1] not in FILE_SUFFIXES}
        else:
            names = named_in(text, sections, keys, tags)
        for name in sorted(names):
            why = resolve(name)
            if why:
                unresolved.append(f"{page.relative_to(ROOT)}: {name} ({why})")
        for path in FILE.findall(text):
            if not (ROOT / "src" / path.removeprefix("src/")).is_file():
                unresolved.append(f"{page.relative_to(ROOT)}: {path} (no such file)")
    assert not unresolved, "names in the docs that the package does not have:\n" + "\n".join(unresolved)
