"""Files with one metadata entry replaced, and the check that pconv refuses them (shared by several tests)."""

from __future__ import annotations

import pytest
import torch

import nets
import pconv


def snn_file_with_metadata(tmp_path, key: str, value: str, also: dict[str, str] | None = None):
    """A small SNN file whose metadata entry `key` is replaced by `value`, and those of `also` by theirs
    (tensors untouched)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = nets.vgg_small().eval()
    model.pconv_source = pconv.ModelSource("factory", "nets:vgg_small")
    images = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(6))]
    path = pconv.save(pconv.convert(model, images, time_steps=4, method="none"), tmp_path / "s.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    meta[key] = value
    meta.update(also or {})
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    return bad


def assert_refused(bad, match: str) -> None:
    """pconv.load raises FormatError, and `pconv inspect` ends in a one-line Error with exit code 1."""
    from click.testing import CliRunner

    from pconv.cli.main import cli

    with pytest.raises(pconv.FormatError, match=match):
        pconv.load(bad, trust_factory=True)
    result = CliRunner().invoke(cli, ["inspect", str(bad)])
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1].startswith("Error:")
