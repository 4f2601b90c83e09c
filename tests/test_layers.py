"""The package's import graph, drawn from every import statement (module level or inside a function):
no circle, every arrow pointing down the layers of docs/design.md, and recipes reaching each other only
through the shared builders."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jalign"

# Lowest first. A module may import its own layer and those below it.
LAYERS = [
    ("kernels",),
    ("parallel",),
    ("data", "rewards"),
    ("models",),
    ("losses",),
    ("specs",),
    ("config", "config_flag", "optim"),
    ("trainer", "checkpoints", "metrics", "run_folder", "rollout"),
    ("serve.critic", "serve.engine", "serve.generation", "serve.triton"),
    ("recipes",),
    ("train", "plan", "score", "evaluate", "export", "distill", "steerlm", "demo", "report", "cli", "serve.__main__"),
]
SHARED_RECIPES = {"recipes.build", "recipes.rollouts", "recipes.reward", "recipes.critic"}


def _modules() -> dict[str, Path]:
  out = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def _imports(modules) -> dict[str, set[str]]:
  """``module -> modules of ours it imports`` (names relative to the package; "" is the package)."""
  def resolve(name: str) -> str:
    name = name.removeprefix("jalign").removeprefix(".")
    while name and name not in modules:
      name = name.rpartition(".")[0]
    return name

  graph = {}
  for module, path in modules.items():
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        found |= {resolve(a.name) for a in node.names if a.name.split(".")[0] == "jalign"}
      elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jalign":
        found |= {resolve(f"{node.module}.{a.name}") for a in node.names}
    graph[module] = found - {module, ""}
  return graph


def _layer(module: str) -> int:
  for i, prefixes in enumerate(LAYERS):
    if any(module == p or module.startswith(p + ".") for p in prefixes):
      return i
  raise AssertionError(f"jalign.{module} is in no layer of LAYERS")


def test_no_import_circles():
  graph = _imports(_modules())
  done, path = set(), []

  def visit(module):
    if module in path:
      raise AssertionError("import circle: " + " -> ".join(path[path.index(module):] + [module]))
    if module in done:
      return
    path.append(module)
    for other in graph[module]:
      visit(other)
    path.pop()
    done.add(module)

  for module in graph:
    visit(module)


def test_imports_point_down_the_layers():
  graph = _imports(_modules())
  upward = [f"jalign.{a} -> jalign.{b}" for a, targets in graph.items() if a for b in targets
            if _layer(b) > _layer(a)]
  assert not upward, upward


def test_recipes_meet_only_through_the_shared_builders():
  graph = _imports(_modules())
  crossing = [f"jalign.{a} -> jalign.{b}" for a, targets in graph.items() if a.startswith("recipes.")
              for b in targets if b.startswith("recipes.") and b not in SHARED_RECIPES]
  assert not crossing, crossing


def test_the_check_sees_an_upward_import():
  assert _layer("trainer") < _layer("recipes.build") and _layer("models.llama") > _layer("data.chat")
  graph = _imports(_modules())
  assert "recipes.build" in graph["recipes.rollouts"] and "parallel.mesh" in graph["trainer"]
