"""The layering of the code base, checked: every import points down, no import circle,
the serving path imports no training code."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("qarm_features", "transformations")

# Floors, bottom first (docs/architecture.md). A module may import its own floor and below.
FLOORS: list[set[str]] = [
    # 0: vocabulary
    {
        "qarm_features.errors",
        "qarm_features._validate",
        "qarm_features._atomic",
        "qarm_features._version",
        "qarm_features.config",
        "qarm_features.schema",
        "qarm_features.metrics",
        "qarm_features.project",
        "qarm_features.progress",
        "qarm_features.threads",
    },
    # 1: the stages' estimators: data sets, content encoders, pair miners, the aligner, coders
    {
        "qarm_features.datasets.*",
        "qarm_features.content.*",
        "qarm_features.pairs.*",
        "qarm_features.align.*",
        "qarm_features.codes.*",
        "qarm_features.ranking",
        "qarm_features.build.tables",
    },
    {"qarm_features.bundle.*"},  # 2: the bundle and the one encode both paths call
    {"qarm_features.build.*"},  # 3: the offline pipeline, versioned builds, Ray stages
    # 4: the Feast library layer, and a repo's build (its qarm.yaml, declarations, push)
    {"qarm_features.feast.*", "qarm_features.build.repo"},
    {"transformations.*"},  # 5: the UDF bodies Feast runs
    {"qarm_features.app.*", "qarm_features"},  # 6: applications (cli, evaluation), the API
]
# A name is one module; "pkg.*" is a package and every module in it.


def _floor(module: str) -> int | None:
    """The module's floor: its own name if listed, else the innermost listed package."""
    for i, names in enumerate(FLOORS):
        if module in names:
            return i
    best, depth = None, -1
    for i, names in enumerate(FLOORS):
        for name in names:
            if name.endswith(".*"):
                pkg = name[:-2]
                if (module == pkg or module.startswith(pkg + ".")) and pkg.count(".") > depth:
                    best, depth = i, pkg.count(".")
    return best


def _modules():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


def _imports(path: Path) -> set[str]:
    """Every module imported anywhere in the file (function bodies included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES + ("benchmarks", "tests")}


def test_every_module_has_a_floor():
    unknown = [m for m, _ in _modules() if _floor(m) is None]
    assert not unknown, f"add these modules to FLOORS (and docs/architecture.md): {unknown}"


def test_imports_point_down():
    known = {m for m, _ in _modules()}
    upward = []
    for module, path in _modules():
        floor = _floor(module)
        for target in _imports(path):
            if target.split(".")[0] in ("benchmarks", "tests"):
                upward.append(f"{module} imports {target} (not part of the package)")
                continue
            if target not in known:  # `from pkg import name` of a function or class
                continue
            t = _floor(target)
            if t is not None and floor is not None and t > floor:
                upward.append(f"{module} (floor {floor}) imports {target} (floor {t})")
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    """No module reaches itself through imports (function bodies included), benchmarks
    too: a circle makes import order matter and hides which module owns what."""
    mods = dict(_modules())
    mods.update(
        (f"benchmarks.{p.stem}" if p.stem != "__init__" else "benchmarks", p)
        for p in sorted((ROOT / "benchmarks").glob("*.py"))
    )
    graph = {m: {t for t in _imports(p) if t in mods and t != m} for m, p in mods.items()}
    seen: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(m: str, path: list[str]) -> None:
        seen[m] = 1
        for t in sorted(graph[m]):
            if seen.get(t) == 1:
                circles.append(" -> ".join(path[path.index(t) :] + [t]))
            elif t not in seen:
                visit(t, path + [t])
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m, [m])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_serving_path_imports_no_training_code(random_bundle):
    """What an on-demand view reaches at request time: numpy, pandas, faiss, the bundle."""
    script = textwrap.dedent(
        f"""
        import sys
        from qarm_features.feast.context import ServingContext
        from transformations import batch, on_demand
        import qarm_features.feast.views, qarm_features.feast.serving
        ctx = ServingContext.of_bundle({str(random_bundle)!r})
        out = on_demand.qarm_cold_python({{"raw_emb": [[0.5] * ctx.raw_dim]}}, ctx.to_json())
        assert out["qarm_error"] == [""], out
        training = ("torch", "sklearn", "sentence_transformers", "qarm_features.align.aligner",
                    "qarm_features.pairs.mining", "qarm_features.pairs.swing", "qarm_features.pairs.retrieval",
                    "qarm_features.content.finetune",
                    "qarm_features.build.bundles", "qarm_features.build.pipeline", "qarm_features.datasets.movielens",
                    "qarm_features.datasets.synthetic", "qarm_features.content.encoders", "qarm_features.app",
                    "qarm_features.ranking", "qarm_features.metrics")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "sklearn",
                        "sentence_transformers") or m in training)
        print(loaded)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


@pytest.mark.parametrize("pkg", ["benchmarks", "examples", "tests"])
def test_the_installed_package_does_not_ship(pkg):
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = cfg["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not any(p.split("*")[0] == pkg for p in include)


def test_the_public_api_resolves_and_imports_nothing_heavy():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, qarm_features as q; print('torch' in sys.modules);"
         "[getattr(q, n) for n in q.__all__]; print('ok')"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "ok"]
