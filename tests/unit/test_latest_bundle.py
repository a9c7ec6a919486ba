"""`LATEST` resolution is confined to its bundles directory: a name that climbs out of it
or a symlinked bundle directory is refused with the fix; a named bundle path is taken as
given; the bundles directory itself may be a symlink (a mount)."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from qarm_features.app.cli import app
from qarm_features.build.bundles import LATEST, latest_bundle
from qarm_features.bundle.artifact import load_bundle
from qarm_features.bundle.testing import make_random_bundle
from qarm_features.errors import InputError


@pytest.fixture
def roots(tmp_path):
    """``bundles/`` holding one real build, and a bundle outside it."""
    root = tmp_path / "repo" / "artifacts" / "bundles"
    root.mkdir(parents=True)
    inside = make_random_bundle(tmp_path / "tmp-in")
    version = load_bundle(inside).version
    os.replace(inside, root / version)
    (root / LATEST).write_text(version + "\n")
    outside = make_random_bundle(tmp_path / "elsewhere" / "b", seed=4)
    return root, version, outside


def test_latest_names_a_directory_of_the_bundles_directory(roots, tmp_path):
    root, version, _ = roots
    assert latest_bundle(root) == root / version
    mounted = tmp_path / "mounted"  # the bundles directory itself may be a link
    mounted.symlink_to(root, target_is_directory=True)
    assert load_bundle(latest_bundle(mounted)).version == version


@pytest.mark.parametrize("name", ["../../../elsewhere/b", "..", "/etc", "a/../../b", ""])
def test_a_latest_that_leaves_the_directory_is_refused(roots, name):
    root, _, _ = roots
    (root / LATEST).write_text(name)
    with pytest.raises(InputError, match="not the name of a bundle directory in .*--bundle PATH"):
        latest_bundle(root)


def test_a_symlinked_bundle_directory_is_refused(roots):
    root, _, outside = roots
    version = load_bundle(outside).version
    (root / version).symlink_to(outside, target_is_directory=True)
    (root / LATEST).write_text(version)
    with pytest.raises(InputError, match=f"is a symlink to {outside}"):
        latest_bundle(root)
    assert load_bundle(outside).version == version  # named by its path: taken as given


def test_the_cli_refuses_it_from_another_directory(roots, tmp_path, monkeypatch):
    root, _, _ = roots
    repo = root.parent.parent
    (repo / "qarm.yaml").write_text(
        "catalog: {path: items.parquet, text: '{title}'}\nevents: {path: events.parquet}\n"
    )
    (root / LATEST).write_text("../../../elsewhere/b")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["inspect", "--repo", str(repo)])
    assert result.exit_code == 1
    assert "not the name of a bundle directory" in result.output.replace("\n", " ")
