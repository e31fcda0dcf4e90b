"""Method plugins come from methods/ folders and from installed packages' entry points, without editing kdbench."""

import os
import shutil
import sys

import pytest

from kdbench import KdbenchError
from kdbench import registry
from kdbench.cli import main
from kdbench.config.load import load_suite
from kdbench.plan import make_plan

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


def test_a_plugin_overrides_a_builtin_and_says_so(fresh_registry, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "clash"
    folder.mkdir()
    (folder / "again.py").write_text(PLUGIN.format(cls="Again", name="kd"))
    monkeypatch.setenv("KDBENCH_METHODS", str(folder))
    assert registry.get_method("kd").__name__ == "Again"
    notice = [line for line in capsys.readouterr().err.splitlines() if "notice" in line]
    assert len(notice) == 1 and str(folder / "again.py") in notice[0] and "kd.py" in notice[0], notice


def test_first_of_two_plugin_folders_wins(fresh_registry, tmp_path, monkeypatch, capsys):
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine.py").write_text(PLUGIN.format(cls=name.title(), name="mine"))
    monkeypatch.setenv("KDBENCH_METHODS", os.pathsep.join(str(tmp_path / n) for n in ("first", "second")))
    assert registry.get_method("mine").__name__ == "First"
    assert "notice: method 'mine'" in capsys.readouterr().err


def test_a_copy_of_the_builtins_in_dot_methods_is_no_clash(fresh_registry, tmp_path, capsys):
    """A user copies methods/ to edit one method: identical files are the same methods, the edited one wins."""
    shutil.copytree(registry.BUILTIN_METHODS, tmp_path / "methods")
    assert {"baseline", "kd", "fitnets", "rco", "takd", "prokt", "dkd"} <= set(registry.methods())
    assert capsys.readouterr().err == ""
    edited = tmp_path / "methods" / "kd.py"
    edited.write_text(edited.read_text().replace('"T": 4.0', '"T": 2.0'))
    registry.methods.cache_clear()
    assert registry.get_method("kd").defaults["T"] == 2.0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(edited) in err[0] and "is used, not" in err[0], err


def test_a_broken_plugin_is_skipped_in_one_line(fresh_registry, tmp_path, capsys):
    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / "broken.py").write_text("def oops(:\n")
    (tmp_path / "methods" / "fine.py").write_text(PLUGIN.format(cls="Fine", name="fine"))
    found = registry.methods()
    assert "fine" in found and "kd" in found
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.py" in err[0] and "SyntaxError" in err[0] and "line 1" in err[0], err
    with pytest.raises(KdbenchError, match="broken.py: method plugin failed to import"):
        registry.get_method("broken")


def test_cli_with_a_broken_plugin(fresh_registry, tmp_path, write_suite, monkeypatch, capsys):
    """`kdbench methods` lists the others (exit 0); a suite naming the broken one fails at validation, naming it."""
    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / "broken.py").write_text("class Broken(:\n")
    path = write_suite({"methods": ["baseline", "broken"]})
    monkeypatch.setattr(sys, "argv", ["kdbench", "methods"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    assert exit_info.value.code == 0
    assert "baseline" in out and "kd" in out
    err = err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdbench: warning: ") and "broken.py" in err[0], err
    monkeypatch.setattr(sys, "argv", ["kdbench", "validate", str(path)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert str(path) in err[0] and "methods.1" in err[0] and "broken.py" in err[0] and "SyntaxError" in err[0], err


MODIFIER_PLUGIN = '''
from kdbench.modifier import Modifier


class ClipTeacher(Modifier):
    name = "clip_teacher"
    summary = "the logits clipped before the method's logit losses see them"
    defaults = {"bound": 10.0}
    changes_logits = True

    def logits(self, logits, batch):
        return logits.float().clamp(-self.params["bound"], self.params["bound"])
'''


def test_a_modifier_is_one_file_found_where_methods_are(fresh_registry, tmp_path, monkeypatch, write_suite):
    """docs/methods.md's "Adding a modifier" example: one file in a KDBENCH_METHODS folder, nothing else."""
    folder = tmp_path / "my_modifiers"
    folder.mkdir()
    (folder / "clip_teacher.py").write_text(MODIFIER_PLUGIN)
    monkeypatch.setenv("KDBENCH_METHODS", str(folder))
    assert registry.get_modifier("clip_teacher").defaults == {"bound": 10.0}
    assert "clip_teacher" not in registry.methods()
    path = write_suite({"methods": ["kd", {"method": "kd", "modify": {"clip_teacher": {"bound": 3}}}]})
    plan = make_plan(load_suite(path), path)
    job = next(j for j in plan.jobs if j.method.label == "kd+clip_teacher")
    assert job.config["modify"]["params"] == {"bound": 3} and job.config["modify"]["method_hash"]
    before = job.key
    (folder / "clip_teacher.py").write_text(MODIFIER_PLUGIN.replace("return logits", "return 0.5 * logits"))
    registry.methods.cache_clear()
    again = next(j for j in make_plan(load_suite(path), path).jobs if j.method.label == "kd+clip_teacher")
    assert again.key != before  # an edit of the modifier's file retrains its jobs
