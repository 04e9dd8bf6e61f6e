"""The structure ARCHITECTURE.md draws, checked from the source: imports flow one way through the layers, and
nothing outside glmlab/models/ probes a model for capabilities or branches on a family's name (it reads the
family's traits instead)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "glmlab"

# Lowest first; a module may import from its own layer and those below it, never above. (Modules of one
# package form one layer; the package's own module cycles are checked separately.)
LAYERS = [
    ["errors", "version"], ["atomic"], ["schema"], ["data"], ["models"], ["config"], ["runtime"],
    ["generation", "embeddings"], ["runs"], ["evaluation"], ["training"], ["finetune"], ["bench"], ["interop"],
    ["serve"], ["cli", "latent_cli", "chat_cli", "cli_args"],
    ["__main__", "glmlab"],
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """glmlab modules ``path`` imports, at any depth (imports inside functions count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "glmlab":
            named = [f"{node.module}.{alias.name}" for alias in node.names]
            found.update([n for n in named if n in modules] or [node.module])
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "glmlab")
    return found


def _layer(module: str) -> int:
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "glmlab"
    return next(i for i, layer in enumerate(LAYERS) if name in layer)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                out.append([v, *component])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_imports_flow_down_the_layers():
    modules = _modules()
    upward = [f"{m} imports {t}" for m, path in sorted(modules.items()) for t in sorted(_imports(path, modules))
              if _layer(t) > _layer(m)]
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_import_cycles_between_modules():
    modules = _modules()
    graph = {m: {t for t in _imports(p, modules) if t in modules and t != m} for m, p in modules.items()}
    assert _cycles(graph) == []


def test_every_package_has_a_layer():
    names = {m.split(".")[1] if "." in m else m for m in _modules()}
    assert names <= {name for layer in LAYERS for name in layer}


PROBE = re.compile(r"\b(hasattr|getattr)\(")
FAMILY_BRANCH = re.compile(r"\bfamily\s*(==|!=)|(==|!=)\s*['\"](gpt|lstm|vae|seqgan)['\"]|\bisinstance\([^)]*\b"
                           r"(GPT|LSTMLM|SeqGAN|SentenceVAE)\b")


def test_outside_models_nothing_probes_a_model_or_branches_on_a_family():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.is_relative_to(PACKAGE / "models"):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if PROBE.search(line) or FAMILY_BRANCH.search(line):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not found, "read the model's traits instead:\n" + "\n".join(found)


def test_the_checks_above_can_fail():
    assert PROBE.search('if hasattr(model, "latent_dim"):') and PROBE.search('getattr(model, "decode_step", None)')
    assert FAMILY_BRANCH.search('if run.config.model.family == "vae":') and FAMILY_BRANCH.search("isinstance(m, GPT)")
    assert _layer("glmlab.models.gpt") < _layer("glmlab.training.trainer")
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]] or _cycles({"a": {"b"}, "b": {"a"}}) != []
