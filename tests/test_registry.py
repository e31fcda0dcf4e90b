"""Method plugins come from methods/ folders and from installed packages' entry points, without editing kdbench."""

import sys

import pytest

from kdbench import KdbenchError
from kdbench import registry

PLUGIN = '''
from kdbench.losses import cross_entropy
from kdbench.method import Method


class {cls}(Method):
    name = "{name}"
    summary = "a plugin from outside the repository"
    defaults = {{"weight": 1.0}}

    def losses(self, batch, student, teacher):
        return {{"ce": self.params["weight"] * cross_entropy(student.logits, batch.labels)}}
'''


@pytest.fixture
def fresh_registry():
    registry.methods.cache_clear()
    yield
    registry.methods.cache_clear()


def test_builtin_methods_are_registered(fresh_registry):
    assert {"baseline", "kd", "fitnets", "rco", "takd", "prokt", "dkd"} <= set(registry.methods())


def test_folder_named_in_KDBENCH_METHODS(fresh_registry, tmp_path, monkeypatch):
    folder = tmp_path / "my_methods"
    folder.mkdir()
    (folder / "scaled_ce.py").write_text(PLUGIN.format(cls="ScaledCE", name="scaled_ce"))
    monkeypatch.setenv("KDBENCH_METHODS", str(folder))
    assert registry.get_method("scaled_ce").defaults == {"weight": 1.0}


def test_entry_point_of_an_installed_package(fresh_registry, tmp_path, monkeypatch):
    (tmp_path / "kdplugin_pkg.py").write_text(PLUGIN.format(cls="FromPackage", name="from_package"))
    dist = tmp_path / "kdplugin_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kdplugin-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[kdbench.methods]\nfrom_package = kdplugin_pkg\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert registry.get_method("from_package").summary == "a plugin from outside the repository"
    sys.modules.pop("kdplugin_pkg", None)


def test_two_plugins_with_one_name_is_an_error(fresh_registry, tmp_path, monkeypatch):
    folder = tmp_path / "clash"
    folder.mkdir()
    (folder / "again.py").write_text(PLUGIN.format(cls="Again", name="kd"))
    monkeypatch.setenv("KDBENCH_METHODS", str(folder))
    with pytest.raises(KdbenchError, match="method 'kd' is already defined"):
        registry.methods()
