"""The backbone registry: naming rules, lazy import, and third-party entry points."""

from __future__ import annotations

import sys

import pytest

from m2pt_cli.errors import UserError
from m2pt_cli.registry import BACKBONES, Registry


def test_builtin_llava_is_registered():
    assert "llava" in BACKBONES.names()
    assert {"projector", "lm_head", "language_model"} <= set(BACKBONES.get("llava").trainable_modules)


@pytest.mark.parametrize("name", ["LLaVA", "my backbone", "", "9x"])
def test_register_rejects_bad_names(name):
    with pytest.raises(ValueError, match="lowercase"):
        Registry("thing").register(name, "a.b:C")


def test_register_rejects_duplicates_and_bad_targets():
    reg = Registry("thing")
    reg.register("one", "a.b:C")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("one", "a.b:D", origin="other-pkg")
    with pytest.raises(ValueError, match="module:attr|package.module:Attr"):
        reg.register("two", "a.b.C")


def test_unknown_name_suggests_and_lists():
    with pytest.raises(UserError, match=r"unknown backbone 'lava'; did you mean 'llava'\? \(available: .*llava"):
        BACKBONES.get("lava")


def test_third_party_backbone_through_entry_points(tmp_path, monkeypatch):
    """A package that declares ``[m2pt.backbones] mine = my_pkg:MyBackbone`` is found by name."""
    pkg = tmp_path / "my_pkg.py"
    pkg.write_text("class MyBackbone:\n    trainable_modules = ('projector',)\n    marker = 'third-party'\n")
    dist = tmp_path / "my_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[m2pt.backbones]\nmine = my_pkg:MyBackbone\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("backbone", group="m2pt.backbones")
    reg.register("llava", "m2pt_cli.backbones.llava:LlavaBackbone")
    assert reg.names() == ["llava", "mine"]
    assert reg.get("mine").marker == "third-party"
    sys.modules.pop("my_pkg", None)
