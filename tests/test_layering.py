"""The package's import graph: one way, no cycle, and private transformers/peft state touched in one module only.

Every first-party import counts, at module level or inside a function (an import moved into a function to dodge
a cycle is still a cycle). Importing ``quept_hf.a.b`` also runs ``quept_hf/a/__init__.py``, so a subpackage's
``__init__`` counts as a dependency of its modules. The layers below are what README.md's "Layering" describes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "quept_hf"

# Low to high: a module may import its own layer and the layers below it, never above.
LAYERS = (
    ("compat", "naming", "atomic", "_version"),  # no first-party imports (atomic, naming: constants)
    ("config",),  # QuEPTConfig, quept_config(model)
    ("nn", "models", "mbclora", "assets", "calibration.capture", "calibration.data", "calibration.checkpoint",
     "calibration.mbtome", "calibration.reparam", "calibration.rotation", "calibration.smoothing",
     "calibration.offload", "calibration.memory", "calibration.gptq", "packing",
     "packing.codec", "packing.linear", "packing.working", "packing.kernels", "packing.frozen"),  # algorithm
    ("inspection",),  # finding layers and adapters on a model
    ("switch",),  # set_bits / set_adapter
    ("calibration", "calibration.engine", "calibration.compensation", "evaluation", "mixed_precision"),
    ("packing.plan", "packing.gguf", "packing.gguf_blocks", "packing.interop", "packing.freeze", "packing.stream",
     "packing.export", "serialization"),  # storage formats
    ("hub",),  # metadata and model cards
    ("saving",),  # save_pretrained / push_to_hub
    ("quantizer", "cli", ""),  # transformers' hooks, the command line, the package's front door
)  # fmt: skip

# Private attributes of transformers/peft objects: only quept_hf.compat may name them.
PRIVATE = (
    "_hf_peft_config_loaded", "_weight_conversions", "_keys_to_ignore_on_load_missing", "_is_hf_initialized",
    "all_tied_weights_keys", "_global_mapping", "_raise_exceptions_for_missing_entries", "_member_map_",
    "_value2member_map_", "_member_names_",
)  # fmt: skip


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The first-party modules an import statement loads (dotted, relative to the package; "" is the package)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names if alias.name.split(".")[0] == "quept_hf"]
        return [name.removeprefix("quept_hf").lstrip(".") for name in names]
    if node.level == 0:
        if not (node.module or "").startswith("quept_hf"):
            return []
        base = node.module.removeprefix("quept_hf").lstrip(".")
    else:
        package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        package = [p for p in package if p]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, *([node.module] if node.module else [])])
    targets = []
    for alias in node.names:
        child = f"{base}.{alias.name}" if base else alias.name
        targets.append(child if child in MODULES else base)
    return targets


def _with_parents(target: str) -> list[str]:
    """``a.b.c`` and the subpackage ``__init__``s that run first (``a``, ``a.b``); the root runs anyway."""
    parts = target.split(".") if target else []
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)] or [""]


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _resolve(name, node):
                    graph[name].update(t for t in _with_parents(target) if t != name and not name.startswith(t + "."))
    return graph


def _layer(module: str) -> int:
    package = module.split(".")[0]
    for index, layer in enumerate(LAYERS):
        if module in layer or (package in ("nn", "models", "mbclora") and package in layer):  # whole subpackages
            return index
    raise AssertionError(f"quept_hf.{module} is in no layer of tests/test_layering.py: add it where it belongs")


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as a path of module names, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node], _ = 2, stack.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycle():
    graph = _edges()
    graph[""] = set()  # the package's __init__ is the front door: it imports everything, nothing imports it
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(f"quept_hf.{m}".rstrip(".") for m in cycle)


def test_no_module_imports_the_front_door():
    front = LAYERS[-1]
    importers = sorted(name for name, targets in _edges().items() if "" in targets and name not in front)
    assert not importers, f"{importers} import the package itself (quept_hf/__init__): import the module instead"


def test_imports_point_down_the_layers():
    upward = [
        f"quept_hf.{name} (layer {_layer(name)}) imports quept_hf.{target} (layer {_layer(target)})"
        for name, targets in _edges().items()
        if name
        for target in targets
        if target and _layer(target) > _layer(name)
    ]
    assert not upward, "\n".join(upward)


def _names(path: Path) -> set[str]:
    """Attribute names, keyword names and string constants of a module's code (docstrings aside: they are
    statements, not names, and may explain what compat does)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.keyword) and node.arg:
            found.add(node.arg)
        elif isinstance(node, ast.Call):
            found.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return found


@pytest.mark.parametrize("attribute", PRIVATE)
def test_private_state_is_touched_only_in_compat(attribute):
    users = sorted(name for name, path in MODULES.items() if name != "compat" and attribute in _names(path))
    assert not users, f"{users} use {attribute!r}: go through quept_hf.compat"


def test_method_overrides_only_through_compat():
    users = sorted(
        name for name, path in MODULES.items() if name != "compat" and "BoundOverride" in path.read_text("utf-8")
    )
    assert not users, f"{users} patch methods themselves: use quept_hf.compat.override_method"


def test_the_checker_sees_a_cycle():
    """The cycle finder itself: a -> b -> a is found, a -> b is not."""
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
