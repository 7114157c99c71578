"""The package's shape, held by its imports: layers import only downwards, no module imports itself back
through others, the objectives stay pure maths, and no module is over MAX_LINES lines.

`LAYERS` is the one declaration of the order (README's Layout picture is checked against it). Every
import counts: module level, inside functions, under `if TYPE_CHECKING:`, relative or absolute.
"""
from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lite_srpo", "ui")
MAX_LINES = 500

# Bottom to top: a module may import its own layer and the layers below it, never one above.
# Each layer is (the name README draws, the modules it holds: a package prefix or one module).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("errors.py", ("lite_srpo.errors",)),
    ("config/", ("lite_srpo.config",)),
    ("run/", ("lite_srpo.run",)),
    ("data/", ("lite_srpo.data", "lite_srpo.tasks")),  # tasks: the old import path, re-exported
    ("rewards/", ("lite_srpo.rewards",)),
    ("model/", ("lite_srpo.model",)),
    ("rl/", ("lite_srpo.rl",)),
    ("eval/", ("lite_srpo.eval",)),
    ("ui/", ("ui",)),
    ("cli.py", ("lite_srpo.cli", "lite_srpo.__main__", "lite_srpo.__init__")),
)
PURE = "lite_srpo.rl.objectives"  # tensors in, tensors out: imports nothing else of the package


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file; a package's own code is `<package>.__init__`."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            out[".".join(path.relative_to(root).with_suffix("").parts)] = path
    return out


def layer_of(module: str) -> int:
    """Index in LAYERS of the most specific entry that holds `module`."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    if best is None:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {Path(__file__).name}")
    return best


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module an imported dotted name refers to: the name itself, its package's code, or the longest
    module prefix (an attribute of that module); None outside the package."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules:
            return candidate
        if candidate + ".__init__" in modules:
            return candidate + ".__init__"
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[tuple[str, int]]:
    """(imported module, line) for every import statement anywhere in the file."""
    package = module.rsplit(".", 1)[0]  # for `pkg.__init__` this is `pkg` itself, as Python resolves it
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for a in node.names:  # `from pkg import name`: a submodule if there is one, else pkg's own code
                sub = f"{source}.{a.name}"
                names.append(sub if _resolve(sub, modules) in (sub, sub + ".__init__") else source)
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                found.add((target, node.lineno))
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[tuple[str, int]]]:
    modules = module_files(root)
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def cycles(graph: dict[str, set[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_is_in_a_layer():
    for module in module_files():
        layer_of(module)


def test_no_import_goes_up_a_layer():
    graph = import_graph()
    upward = [f"{src} (layer {LAYERS[layer_of(src)][0]}) line {line} imports {dst} (layer {LAYERS[layer_of(dst)][0]})"
              for src, targets in sorted(graph.items()) for dst, line in sorted(targets)
              if layer_of(dst) > layer_of(src)]
    assert not upward, "imports from a lower layer to a higher one:\n  " + "\n  ".join(upward)


def test_no_import_circles():
    found = cycles(import_graph())
    assert not found, "import circles:\n  " + "\n  ".join(" <-> ".join(c) for c in found)


def test_objectives_are_pure():
    graph = import_graph()
    impure = [f"{src} imports {dst}" for src, targets in graph.items() if src.startswith(PURE + ".")
              for dst, _ in targets if not dst.startswith(PURE + ".")]
    assert not impure, "objectives/ takes and returns tensors only:\n  " + "\n  ".join(impure)


def test_no_module_is_over_the_size_limit():
    long = {m: n for m, p in module_files().items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them along their jobs): {long}"


def test_readme_draws_the_layers_in_this_order():
    """README's Layout picture lists the layers top to bottom, one per line, each line starting with its name."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = text.split("\n## Layout", 1)[1].split("\n## ", 1)[0]
    picture = re.search(r"```text\n(.*?)```", layout, re.S)
    assert picture, "README's Layout section needs its ```text picture of the layers"
    names = {name for name, _ in LAYERS}
    drawn = [first for line in picture.group(1).splitlines() if (first := line.split()[0] if line.split() else "") in names]
    assert drawn == [name for name, _ in reversed(LAYERS)], f"README draws {drawn}"


def test_the_check_bites(tmp_path):
    """An upward import written inside a function is caught, and so is the circle it closes."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package)
    prompts = tmp_path / "lite_srpo" / "data" / "prompts.py"
    prompts.write_text(prompts.read_text(encoding="utf-8") + "\n\ndef _probe():\n    from ..rl import train\n",
                       encoding="utf-8")
    graph = import_graph(tmp_path)
    up = {dst for dst, _ in graph["lite_srpo.data.prompts"] if layer_of(dst) > layer_of("lite_srpo.data.prompts")}
    assert up == {"lite_srpo.rl.train"}
    assert any({"lite_srpo.data.prompts", "lite_srpo.rl.train"} <= set(c) for c in cycles(graph))
