"""lab.gain_probe: the split of a model's detail into a gain along a reference's and the rest, and the CLI end to
end on tiny models (a model against itself: gain 1, nothing else)."""

from __future__ import annotations

import doctest
import json

import pytest
import torch

from lab import gain_probe
from lab.gain_probe import gain_and_rest



def test_doctests():
    assert doctest.testmod(gain_probe).failed == 0


def test_a_scaled_copy_is_all_gain_and_an_orthogonal_pattern_is_all_rest():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 4, 8, 8, generator=g)
    s, rest = gain_and_rest(1.3 * ref, ref)
    assert torch.allclose(s, torch.full((3,), 1.3, dtype=s.dtype)) and float(rest.max()) < 1e-12
    noise = torch.randn(3, 4, 8, 8, generator=g)
    noise -= ((noise * ref).flatten(1).sum(1) / (ref * ref).flatten(1).sum(1)).view(-1, 1, 1, 1) * ref  # orthogonal
    s, rest = gain_and_rest(ref + noise, ref)
    share = (noise.flatten(1) ** 2).sum(1) / ((ref + noise).flatten(1) ** 2).sum(1)
    assert torch.allclose(s, torch.ones(3, dtype=s.dtype), atol=1e-5)
    assert torch.allclose(rest, share.double(), atol=1e-5)


def test_the_gain_probe_cli_finds_no_change_between_a_model_and_itself(env, tmp_path):  # noqa: F811
    out = tmp_path / "gain"
    models = str(env / "models")
    rc = gain_probe.main(["--checkpoint", models, "--reference", models, "--num", "2", "--stages", "middle,final",
                          "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "gain.json").read_text())["stages"]
    assert [r["stage"] for r in rows] == ["middle", "final"]
    for r in rows:
        assert r["gain"] == pytest.approx(1.0, abs=1e-6) and r["rest_share"] < 1e-9 and r["rms"] > 0


def test_bad_gain_probe_arguments_are_named(env, capsys):  # noqa: F811
    models = str(env / "models")
    assert gain_probe.main(["--checkpoint", models, "--reference", models, "--stages", "coarse"]) == 2
    assert "--stages coarse" in capsys.readouterr().err
    assert gain_probe.main(["--checkpoint", models, "--reference", str(env / "nowhere")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
