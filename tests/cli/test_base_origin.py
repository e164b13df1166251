"""Where a base model may come from (#36): a hub id, what the user named, or a file strictly inside
an installed package; never what an adapter or its run folder carries, unless the user names it.

Each attack is refused in one line (exit 2) before anything is converted or loaded: the adapter and
run folders are untouched and ``$M2PT_CACHE`` stays empty (a GGUF base would be converted there)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from m2pt_cli import base_origin
from m2pt_cli.errors import UserError
from tests.gguf_factory import write_gguf
from tests.helpers import m2pt, refused

pytestmark = pytest.mark.bad_input


@pytest.fixture
def cache(tmp_path_factory, monkeypatch) -> Path:
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("M2PT_CACHE", str(folder))
    yield folder
    assert not any(p.is_file() for p in folder.rglob("*")), "a refused base was converted"


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    """A copy of a finished run (no checkpoints) as a stranger would share it."""
    folder = tmp_path / "shared-run"
    shutil.copytree(finished_run, folder, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    return folder


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "digit.png"
    Image.new("RGB", (32, 32), "white").save(path)
    return path


def set_base(recipe_file: Path, value: str, **model_keys) -> None:
    recipe = yaml.safe_load(recipe_file.read_text())
    recipe["model"].update(name_or_path=value, **model_keys)
    recipe_file.write_text(yaml.safe_dump(recipe))


def generate(adapter: Path, image: Path, *extra) -> tuple:
    return ("generate", "--adapter", adapter, "--image", image, "--prompt", "What digit?", *extra)


def test_a_run_folder_cannot_bring_its_base_beside_the_adapter(run, tiny_llava_dir, image, tmp_path, cache):
    shutil.copytree(tiny_llava_dir, run / "bundled-base")
    set_base(run / "adapter" / "recipe.yaml", "../bundled-base")
    refused(generate(run, image), run, "'../bundled-base' is a path relative to the adapter's recipe", "--base-model")
    refused(("eval", "--bench", "demo", "--adapter", run, "--output-dir", tmp_path / "e"), run, "--base-model")
    assert not (tmp_path / "e").exists()
    # the same folder named by its absolute path, in the adapter's recipe or the run's config.yaml
    set_base(run / "adapter" / "recipe.yaml", str(run / "bundled-base"))
    refused(generate(run, image), run, "is inside the adapter folder or its run folder")
    (run / "adapter" / "recipe.yaml").unlink()
    set_base(run / "config.yaml", str(run / "bundled-base"))
    refused(generate(run, image), run, "is inside the adapter folder or its run folder")
    refused(("eval", "--bench", "demo", "--adapter", run, "--base", "--output-dir", tmp_path / "e"), run, "inside")
    # named by the user: allowed
    answer = m2pt(*generate(run, image, "--base-model", run / "bundled-base", "--max-new-tokens", "2"))
    assert answer.returncode == 0


def test_a_base_reached_through_a_link_inside_the_adapter_is_refused(run, tiny_llava_dir, image, tmp_path, cache):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tiny_llava_dir, elsewhere)
    (run / "adapter" / "base").symlink_to(elsewhere, target_is_directory=True)
    set_base(run / "adapter" / "recipe.yaml", str(run / "adapter" / "base"))
    refused(generate(run, image), run, "inside the adapter folder or its run folder")


def pip_folder() -> Path:
    import importlib.util

    return Path(next(iter(importlib.util.find_spec("pip").submodule_search_locations)))


def spec_cases(gguf: Path) -> dict[str, tuple[str, str]]:
    escape = os.path.relpath(gguf, pip_folder())
    return {
        "up and out of the package": (f"package:pip/{escape}", "without '..' or an absolute part"),
        "'..' in the middle": (f"package:pip/_internal/../{escape}", "without '..' or an absolute part"),
        "an absolute FILE": (f"package:pip/{gguf}", "without '..' or an absolute part"),
        "a home-relative FILE": ("package:pip/~/evil.gguf", "without '..' or an absolute part"),
    }


@pytest.mark.parametrize("case", ["up and out of the package", "'..' in the middle", "an absolute FILE"])
def test_an_adapter_cannot_choose_its_own_gguf_through_a_package_spec(run, image, cache, case):
    gguf = write_gguf(run / "adapter" / "evil.gguf")
    spec, needle = spec_cases(gguf)[case]
    set_base(run / "adapter" / "recipe.yaml", spec, backbone="llava")
    refused(generate(run, image), run, "model.name_or_path", needle)


def test_a_package_spec_from_anyone_stays_inside_its_package(tmp_path, cache):
    """The package rule holds in the user's own recipe too, and a link inside the package that
    leads out of it counts as out (variants: '..', absolute, '~', a link)."""
    gguf = write_gguf(tmp_path / "elsewhere.gguf")
    for spec, needle in spec_cases(gguf).values():
        with pytest.raises(UserError, match=needle.replace("'", ".")):
            base_origin.package_file(spec)
    package = tmp_path / "site" / "m2pt_fake_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('never imported')\n")
    (package / "model.gguf").symlink_to(gguf)
    write_gguf(package / "inside.gguf")
    recipe = tmp_path / "r.yaml"
    model = {"backbone": "openclip_vicuna", "name_or_path": "package:m2pt_fake_pkg/model.gguf", "vision_tower": "x"}
    recipe.write_text(yaml.safe_dump({"model": model}))
    env_path = os.environ.get("PYTHONPATH", "")
    result = m2pt("info", recipe, check=False, process=True, env={"PYTHONPATH": f"{tmp_path / 'site'}:{env_path}"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "leads out of the package m2pt_fake_pkg (through a link)" in lines[0]
    import sys

    sys.path.insert(0, str(tmp_path / "site"))
    try:
        assert base_origin.package_file("package:m2pt_fake_pkg/inside.gguf") == (package / "inside.gguf").resolve()
    finally:
        sys.path.remove(str(tmp_path / "site"))


def test_a_recipe_base_that_is_not_a_model_folder_is_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"backbone": "llava", "name_or_path": "/etc"}}))
    refused(["info", recipe], tmp_path, "'/etc' is not a model folder (it holds no config.json)")
    recipe.write_text(yaml.safe_dump({"model": {"backbone": "llava", "name_or_path": "/etc/hostname"}}))
    refused(["info", recipe], tmp_path, "folder '/etc/hostname' is not a folder")
