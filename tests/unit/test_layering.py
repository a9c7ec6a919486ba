"""The layering of the code base, checked: every import points down, the serving path
imports no training code, no module grows past ~500 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("qarm_features", "transformations")
MAX_LINES = 500

# Floors, bottom first (docs/architecture.md). A module may import its own floor and below.
FLOORS: list[set[str]] = [
    {  # 0: vocabulary
        "qarm_features.errors", "qarm_features._validate", "qarm_features._atomic",
        "qarm_features._version",
        "qarm_features.config", "qarm_features.schema", "qarm_features.metrics",
        "qarm_features.project", "qarm_features.progress",
    },
    {  # 1: data, encoders, miners, trainers, coders
        "qarm_features.data", "qarm_features.synthetic", "qarm_features.encoders",
        "qarm_features.pairs", "qarm_features.swing", "qarm_features.retrieval",
        "qarm_features.align",
        "qarm_features.quantize", "qarm_features.vq", "qarm_features._rescore",
        "qarm_features.finetune", "qarm_features.ranking", "qarm_features._contrastive",
        "qarm_features.tables",
    },
    {"qarm_features.manifest", "qarm_features.bundle", "qarm_features.encode"},  # 2: bundle
    {"qarm_features.pipeline", "qarm_features.build", "qarm_features.testing",
     "qarm_features.stable", "qarm_features.distributed",
     "qarm_features.ray_pairs"},  # 3: offline
    # 4: the Feast library layer, and a repo's build (its qarm.yaml, sources, push)
    {"qarm_features.feast.*", "qarm_features.build_repo"},
    {"transformations.*"},  # 5: the UDF bodies Feast runs
    {"qarm_features.app.*", "qarm_features"},  # 6: applications (cli, evaluation), the API
]  # fmt: skip
# A name is one module; "pkg.*" is a package and every module in it.


def _floor(module: str) -> int | None:
    for i, names in enumerate(FLOORS):
        for name in names:
            if name.endswith(".*"):
                pkg = name[:-2]
                if module == pkg or module.startswith(pkg + "."):
                    return i
            elif module == name:
                return i
    return None


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


def test_no_module_passes_the_size_limit():
    big = {
        m: n for m, p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not big, f"modules over {MAX_LINES} lines (two concepts?): {big}"


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
        training = ("torch", "sklearn", "sentence_transformers", "qarm_features.align",
                    "qarm_features.pairs", "qarm_features.swing", "qarm_features.retrieval",
                    "qarm_features.finetune",
                    "qarm_features.build", "qarm_features.pipeline", "qarm_features.data",
                    "qarm_features.synthetic", "qarm_features.encoders", "qarm_features.app",
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
