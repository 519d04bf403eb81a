"""The import rules of docs/architecture.md: each layer imports only itself and the layers below,
and no two modules import each other at load time; and what the gateway and the benchmarks
import from outside comes with medgate's dependencies. Read from the source with `ast`, so a
forbidden import fails here before it is ever run."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A module belongs to the first layer whose prefix it starts with, longest first.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("protocols", ("protocols",)),
    ("base", ("gateway", "gateway.logs", "gateway.exits", "gateway.recall", "gateway.privacy",
              "gateway.balancer", "gateway.config")),
    ("net", ("gateway.net",)),
    ("records", ("gateway.records",)),
    ("health", ("health",)),
    ("vips", ("gateway.vips",)),
    ("service", ("gateway.service",)),
    ("testing", ("gateway.testing",)),
    ("commands", ("gateway.commands", "gateway.__main__")),
]


def module_files() -> dict[str, Path]:
    found = {}
    for top in ("gateway", "health", "protocols"):
        for path in (ROOT / top).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def layer_of(module: str) -> int:
    best, rank = "", -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (module.startswith(prefix + ".") and prefix != "gateway")
            if matches and len(prefix) > len(best):
                best, rank = prefix, index
    assert rank >= 0, f"{module}: in no layer of docs/architecture.md"
    return rank


def imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported module, at load time?) for each import of ours in `path`."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    at_load = {id(node) for node in tree.body}
    for node in tree.body:  # imports under a top-level `if`/`try` still run at load time
        if isinstance(node, (ast.If, ast.Try)):
            at_load |= {id(child) for child in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [f"{target}.{alias.name}" for alias in node.names] + [target]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            if candidate in known and candidate != module:
                found.append((candidate, id(node) in at_load))
                break
    return found


def test_no_module_imports_a_higher_layer():
    known = module_files()
    wrong = []
    for module, path in sorted(known.items()):
        for target, _ in imports(module, path, known):
            if layer_of(target) > layer_of(module):
                wrong.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                             f"({LAYERS[layer_of(target)][0]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_at_load_time():
    known = module_files()
    graph = {module: sorted({target for target, at_load in imports(module, path, known)
                             if at_load}) for module, path in known.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in graph[module]:
            if state.get(target) == 1:
                cycles.append(" -> ".join(trail[trail.index(target):] + [module, target])
                              if target in trail else f"{module} -> {target}")
            elif target not in state:
                visit(target, trail + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "\n".join(cycles)


def test_every_module_is_in_a_layer():
    for module in module_files():
        layer_of(module)


def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a net module importing the service layer is reported."""
    fake = tmp_path / "gateway" / "net"
    fake.mkdir(parents=True)
    path = fake / "upward.py"
    path.write_text("from gateway.service.server import Gateway\n")
    known = module_files() | {"gateway.net.upward": path}
    found = imports("gateway.net.upward", path, known)
    assert found == [("gateway.service.server", True)]
    assert layer_of("gateway.service.server") > layer_of("gateway.net.upward")


def test_pool_and_member_state_changes_only_through_the_balancer():
    """The balancer is pure and owns its state: elsewhere, a pool's or a member's fields are
    read, and changed only by calling the Pool's methods (count_refused, take_conn, ...)."""
    import dataclasses

    from gateway.balancer import Member, Pool

    fields = {f.name for cls in (Pool, Member) for f in dataclasses.fields(cls)}
    owner = re.compile(r"(^|_)(pool|member)s?$")
    writes = []
    for module, path in sorted(module_files().items()):
        if module == "gateway.balancer":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, ast.AugAssign) else [])
            for target in targets:
                if not (isinstance(target, ast.Attribute) and target.attr in fields):
                    continue
                base = target.value
                name = (base.attr if isinstance(base, ast.Attribute)
                        else base.id if isinstance(base, ast.Name)
                        else base.func.attr if isinstance(base, ast.Call)
                        and isinstance(base.func, ast.Attribute) else "")
                if owner.search(name):
                    writes.append(f"{module}:{node.lineno}: {ast.unparse(target)}")
    assert not writes, "\n".join(writes)


# Imports a module may make beyond medgate's dependencies: an optional extra, or what a
# benchmark measures (each says how to install it).
OPTIONAL_IMPORTS = {"ldap": "the ldap extra", "httptools": "bench/http_parsers.py measures it",
                    "pytest": "gateway.testing's plugin, which pytest itself loads"}


def test_the_gateway_and_the_benchmarks_import_only_medgates_dependencies():
    """bench-bundle.sh carries only the wheels of pyproject's dependencies: a benchmark that
    imports a test dependency (trustme, once) fails on the quiet machine, not here."""
    import sys
    import tomllib
    from importlib.metadata import PackageNotFoundError, packages_distributions, requires

    def name_of(requirement: str) -> str:
        return re.split(r"[<>=!~;\[ (]", requirement, maxsplit=1)[0].lower().replace("_", "-")

    # what pip installs for medgate: its dependencies and theirs (zeep brings requests)
    waiting = [name_of(r) for r in tomllib.loads(
        (ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    allowed: set[str] = set()
    while waiting:
        name = waiting.pop()
        if name in allowed:
            continue
        try:
            needs = requires(name) or []
        except PackageNotFoundError:  # its marker left it out here (exceptiongroup < 3.11)
            continue
        allowed.add(name)
        waiting += [name_of(r) for r in needs if "extra ==" not in r]
    providers = packages_distributions()
    ours = {"gateway", "health", "protocols", "bench", "common"}
    strays = []
    for top in ("gateway", "health", "protocols", "bench"):
        for path in (ROOT / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    root = name.partition(".")[0]
                    if root in sys.stdlib_module_names or root in ours or root in OPTIONAL_IMPORTS:
                        continue
                    distributions = {d.lower().replace("_", "-")
                                     for d in providers.get(root, [root])}
                    if not distributions & allowed:
                        strays.append(f"{path.relative_to(ROOT)}: {name}")
    assert not strays, strays
