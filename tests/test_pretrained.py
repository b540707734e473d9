"""Shipped model files: ``pretrained:NAME`` resolves to a digest-checked file, anything else is a path."""
from pathlib import Path

import pytest

from ctrefine import pretrained
from ctrefine.errors import DataError


def test_plain_paths_pass_through():
    assert pretrained.resolve("runs/demo/base/best_model.pt") == Path("runs/demo/base/best_model.pt")


def test_unknown_name_damaged_and_missing_files_are_one_line_errors(tmp_path, monkeypatch):
    f = tmp_path / "m.pt"
    f.write_bytes(b"weights")
    monkeypatch.setattr(pretrained, "ROOT", tmp_path)
    monkeypatch.setattr(pretrained, "SHIPPED", {"good": ("m.pt", pretrained.sha256(f)), "bad": ("m.pt", "0" * 64),
                                                "gone": ("nope.pt", "0" * 64)})
    assert pretrained.resolve("pretrained:good") == f
    for name, words in (("nothing", "no such shipped model (shipped: pretrained:bad, pretrained:gone, pretrained:good)"),
                        ("bad", "does not match its recorded sha256"), ("gone", "is missing")):
        with pytest.raises(DataError, match=words.replace("(", r"\(").replace(")", r"\)")) as err:
            pretrained.resolve(f"pretrained:{name}")
        assert "\n" not in str(err.value)
