"""The layering of lottery/: imports go down, never in a circle, never to another module's
private names, and lazily only for the heavy imports listed below.

Layers, bottom to top; a module imports from its own layer or the ones below:

  core         masks, scorers, prune (with counting, count_rules, selection), schedules,
               metrics, steps, groups (and its modules)
  engine       train (with optim, batches), models, data, compact (each with its modules),
               checkpoints, distributed, config, sparse
  run dirs     rundir (naming, writing, reading run directories), runs (the `Run` reader)
  experiments  experiment (what every kind shares), imp, gradual, pai, instability, and
               experiments (the table of kinds)
  face         report, plots, export, sensitivity, data.cli, cli, and the package `lottery`

Every module of lottery/ is parsed with `ast` (nothing is imported), and every import of a
lottery module is an edge of the graph: at module level, or lazy (inside a function).
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lottery")

LAYERS = {
    "core": ["lottery.masks", "lottery.scorers", "lottery.prune", "lottery.counting",
             "lottery.count_rules", "lottery.selection", "lottery.schedules", "lottery.metrics",
             "lottery.steps", "lottery.groups", "lottery.groups.classes", "lottery.groups.jaxprs",
             "lottery.groups.analysis", "lottery.groups.structure", "lottery.groups.channels",
             "lottery.groups.scorers", "lottery.groups.density"],
    "engine": ["lottery.train", "lottery.optim", "lottery.batches", "lottery.models",
               "lottery.models.layers", "lottery.models.lth", "lottery.models.imagenet",
               "lottery.models.vit", "lottery.models.mnist1d",
               "lottery.data", "lottery.data.mnist5k", "lottery.data.mnist1d",
               "lottery.data.transforms", "lottery.data.registry", "lottery.data.tfds_source",
               "lottery.data.stats", "lottery.data.download", "lottery.data.stream",
               "lottery.checkpoints", "lottery.distributed",
               "lottery.config", "lottery.compact", "lottery.compact.units",
               "lottery.compact.resnet", "lottery.sparse"],
    "run dirs": ["lottery.rundir", "lottery.runs"],
    "experiments": ["lottery.experiment", "lottery.imp", "lottery.gradual", "lottery.pai",
                    "lottery.pai.spec", "lottery.pai.ablations", "lottery.pai.runner",
                    "lottery.pai.results", "lottery.instability", "lottery.experiments"],
    "face": ["lottery.report", "lottery.plots", "lottery.export", "lottery.cli",
             "lottery.sensitivity", "lottery.data.cli", "lottery"],
}
RANK = {m: i for i, mods in enumerate(LAYERS.values()) for m in mods}

# The only lazy (function-level) imports of lottery modules, and why each is lazy. Heavy imports
# only: a lazy import that avoids a cycle is a layering bug, not an entry here.
HEAVY = {
    ("lottery.config", "lottery.models"): "config files import lottery.config: no jax at import",
    ("lottery.config", "lottery.masks"): "as above",
    ("lottery.config", "lottery.data"): "as above",
    ("lottery.config", "lottery.prune"): "as above",
    ("lottery.config", "lottery.scorers"): "as above",
    ("lottery.config", "lottery.train"): "as above",
    ("lottery.config", "lottery.groups"): "as above (structure='groups' derives the groups)",
    ("lottery.data", "lottery.data.mnist5k"): "TFDS builders: tensorflow_datasets is slow to "
                                              "import and only needed to prepare a dataset",
    ("lottery.data", "lottery.data.mnist1d"): "as above",
    ("lottery.data", "lottery.data.stream"): "jax and PIL (its reader's transforms), grain: "
                                             "only to read a dataset's records",
    ("lottery.data.stats", "lottery.data.transforms"): "jax and PIL: only to compute the "
                                                       "statistics of a TFDS image dataset",
}


def module_files(root=ROOT) -> dict[str, str]:
    """{dotted module name: path} of every .py file under `root` (the lottery package)."""
    out = {}
    base = os.path.dirname(root)
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), base)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(d, f)
    return out


class _Scanner(ast.NodeVisitor):
    """Collects a module's lottery imports and its attribute accesses on lottery modules."""

    def __init__(self, name: str, known: set[str], is_package: bool):
        self.name, self.known, self.depth = name, known, 0
        self.package = name if is_package else name.rpartition(".")[0]
        self.edges = []  # (target module, line, lazy)
        self.private = []  # (line, what)
        self.bound = {}  # local name -> lottery module

    def _module(self, dotted: str) -> str | None:
        """The longest known module that `dotted` starts with."""
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in self.known:
                return ".".join(parts[:i])
        return None

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node):
        for a in node.names:
            target = self._module(a.name)
            if target is not None:
                self.edges.append((target, node.lineno, self.depth > 0))
                if a.asname:
                    self.bound[a.asname] = target
                else:
                    self.bound[a.name.split(".")[0]] = a.name.split(".")[0]

    def visit_ImportFrom(self, node):
        module = node.module or ""
        if node.level:  # relative: from the package
            base = self.package.split(".")
            base = base[:len(base) - node.level + 1]
            module = ".".join(base + ([module] if module else []))
        if self._module(module) is None:
            return
        for a in node.names:
            sub = f"{module}.{a.name}"
            if sub in self.known:
                self.edges.append((sub, node.lineno, self.depth > 0))
                self.bound[a.asname or a.name] = sub
            else:
                target = self._module(module)
                self.edges.append((target, node.lineno, self.depth > 0))
                if a.name.startswith("_") and target != self.name:
                    self.private.append((node.lineno, f"from {target} import {a.name}"))

    def visit_Attribute(self, node):
        chain, value = [node.attr], node.value
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if isinstance(value, ast.Name) and value.id in self.bound:
            dotted = ".".join([self.bound[value.id], *reversed(chain)])
            target = self._module(dotted)
            rest = dotted[len(target) + 1:].split(".") if target else []
            if target and target != self.name and rest and rest[0].startswith("_") \
                    and not rest[0].startswith("__"):
                self.private.append((node.lineno, f"{target}.{rest[0]}"))
                return
        self.generic_visit(node)


def scan(root=ROOT):
    """{module: _Scanner} for every module under `root`."""
    files = module_files(root)
    out = {}
    for name, path in files.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        s = _Scanner(name, set(files), path.endswith("__init__.py"))
        s.visit(tree)
        out[name] = s
    return out


def cycles(scans) -> list[list[str]]:
    """The import cycles (strongly connected components of more than one module, or a module
    importing itself), each as a sorted list."""
    graph = {m: {t for t, _, _ in s.edges} for m, s in scans.items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def private_accesses(scans) -> list[str]:
    return [f"{m}:{line}: {what}" for m, s in sorted(scans.items()) for line, what in s.private]


def lazy_imports(scans, allowed=HEAVY) -> list[str]:
    return [f"{m}:{line}: imports {t} inside a function" for m, s in sorted(scans.items())
            for t, line, lazy in s.edges if lazy and (m, t) not in allowed and t != m]


def upward_imports(scans, rank=RANK) -> list[str]:
    out = [f"{m}: in no layer (add it to LAYERS)" for m in sorted(scans) if m not in rank]
    for m, s in sorted(scans.items()):
        for t, line, _ in s.edges:
            if m in rank and t in rank and rank[t] > rank[m]:
                out.append(f"{m}:{line}: imports {t}, a layer above it")
    return out


@pytest.fixture(scope="module")
def scans():
    return scan()


def test_no_import_cycle(scans):
    assert cycles(scans) == []


def test_no_module_reaches_another_modules_private_names(scans):
    assert private_accesses(scans) == []


def test_lazy_imports_are_only_the_listed_heavy_ones(scans):
    assert lazy_imports(scans) == []
    used = {(m, t) for m, s in scans.items() for t, _, lazy in s.edges if lazy}
    assert set(HEAVY) <= used, f"stale allow-list entries: {sorted(set(HEAVY) - used)}"


def test_imports_go_down_the_layers(scans):
    assert upward_imports(scans) == []
    assert set(RANK) <= set(scans), f"listed but gone: {sorted(set(RANK) - set(scans))}"


def test_the_checks_catch_each_kind_of_violation(tmp_path):
    """A small package with one violation of every kind: each check reports exactly it."""
    pkg = tmp_path / "lottery"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "low.py": "from lottery import high\n",  # goes up, and closes a cycle with high
        "high.py": "from lottery import low\nx = low._hidden\n",  # private access
        "lazy.py": "def f():\n    from lottery import low\n    return low\n",
        "sub/__init__.py": "from lottery.sub import leaf\n",
        "sub/leaf.py": "from lottery.low import _secret\n",  # private, by name
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    got = scan(str(pkg))
    rank = {"lottery.low": 0, "lottery.lazy": 1, "lottery.sub": 1, "lottery.sub.leaf": 1,
            "lottery.high": 2, "lottery": 3}
    assert cycles(got) == [["lottery.high", "lottery.low"]]
    assert private_accesses(got) == ["lottery.high:2: lottery.low._hidden",
                                     "lottery.sub.leaf:1: from lottery.low import _secret"]
    assert lazy_imports(got, allowed={}) == ["lottery.lazy:2: imports lottery.low inside a "
                                             "function"]
    assert upward_imports(got, rank) == ["lottery.low:1: imports lottery.high, a layer above it"]
