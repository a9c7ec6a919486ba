"""The item entity comes from one place, the repo's declarations: a qarm.yaml whose
`entity:` disagrees stops `qarm build` and `qarm materialize` before anything is written,
naming both; a qarm.yaml without one takes the declared entity."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from qarm_features.app.cli import app
from qarm_features.build.repo import build_from_repo, item_entity
from qarm_features.errors import ConfigError
from qarm_features.feast.scaffold import init_repo
from qarm_features.project import load_project


@pytest.fixture
def repo(tmp_path):
    init_repo(tmp_path / "repo", id_type="string")  # declares `item` keyed on item_id
    return tmp_path / "repo"


def _set_entity(repo, block: str) -> None:
    text = (repo / "qarm.yaml").read_text()
    head, _, tail = text.partition("entity:")
    rest = tail.split("\n")
    keep = [line for line in rest[1:] if not line.startswith("  ")]  # drop the old block
    (repo / "qarm.yaml").write_text(head + block + "\n" + "\n".join(keep))


def test_a_disagreeing_qarm_yaml_stops_before_anything_is_written(repo):
    _set_entity(repo, "entity: {name: product, join_key: sku}")
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    with pytest.raises(ConfigError) as err:
        build_from_repo(repo)
    msg = " ".join(str(err.value).split())
    assert "product" in msg and "sku" in msg  # what qarm.yaml says
    assert "'item'" in msg and "'item_id'" in msg  # what the declarations say
    res = CliRunner().invoke(app, ["materialize", "--repo", str(repo)])
    assert res.exit_code == 1 and "join key 'item_id'" in " ".join(res.output.split())
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before, "something written"


def test_without_entity_the_declarations_decide(repo):
    _set_entity(repo, "")
    project = load_project(repo)
    assert project.entity is None
    found = item_entity(project)
    assert (found.name, found.join_key) == ("item", "item_id")
    _set_entity(repo, "entity: {name: item, join_key: item_id}")  # repeating it is fine
    assert item_entity(load_project(repo)) == found
