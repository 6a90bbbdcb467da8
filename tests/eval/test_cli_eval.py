"""The evaluation commands through the real CLI entry point: bad input is one line and exit 2, and
the options' defaults are those of the config dataclasses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import repa_cache.eval.align as align_mod
import repa_cache.eval.fid as fid_mod
import repa_cache.eval.sample as sample_mod
from repa_cache.eval.config import AlignConfig, FidConfig, SampleConfig


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "--ckpt", "NOPE", "--out", "OUT"], "error: no checkpoint or run folder at NOPE"),
        (["sample", "--ckpt", "FILE", "--out", "OUT"], "error: FILE is not a readable checkpoint of this tool"),
        (["sample", "--ckpt", "FILE", "--out", "OUT", "--guidance-interval", "0.5,2"],
         "error: --guidance-interval must lie within [0, 1], got 0.5,2"),
        (["sample", "--ckpt", "FILE", "--out", "OUT", "--guidance-interval", "0.7,0.2"],
         "error: --guidance-interval needs LOW <= HIGH, got 0.7,0.2"),
        (["fid", "NOPE", "NOPE"], "error: no such samples npz or image folder: NOPE"),
        (["align", "--ckpt", "NOPE"], "error: no checkpoint or run folder at NOPE"),
    ],
)
def test_bad_eval_input_exits_2_with_one_line(args, message, tmp_path, run_cli):
    (tmp_path / "file.pt").write_bytes(b"not a checkpoint")
    subst = {"NOPE": str(tmp_path / "missing"), "OUT": str(tmp_path / "out"), "FILE": str(tmp_path / "file.pt")}
    code, _, err = run_cli([subst.get(a, a) for a in args])
    for k, v in subst.items():
        message = message.replace(k, v)
    assert code == 2, err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("command", ["sample", "align"])
def test_unknown_checkpoint_version_is_one_line_and_exit_2(command, tmp_path, run_cli):
    ckpt = tmp_path / "future.pt"
    torch.save({"format": "repa-cache-checkpoint", "version": 99, "kind": "ema", "step": 1, "ema": {}}, ckpt)
    args = [command, "--ckpt", str(ckpt)] + (["--out", str(tmp_path / "X")] if command == "sample" else [])
    code, out, err = run_cli(args)
    assert code == 2, err
    assert err.strip().splitlines() == [f"error: {ckpt} has checkpoint format version 99; this version reads version 2"]
    assert out == "" and not (tmp_path / "X").exists()


def test_option_defaults_are_the_config_defaults(tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    class Done:
        def describe(self) -> str:
            return "done"

    def fake_sample(ckpt: object, out: object, cfg: SampleConfig) -> Done:
        seen["sample"] = cfg
        return Done()

    def fake_align(ckpt: object, cfg: AlignConfig, quiet: bool) -> dict:
        assert quiet is False
        seen["align"] = cfg
        return {}

    def fake_fid(samples: object, ref: object, cfg: FidConfig) -> dict:
        seen["fid"] = cfg
        return {}

    monkeypatch.setattr(sample_mod, "sample", fake_sample)
    monkeypatch.setattr(align_mod, "align", fake_align)
    monkeypatch.setattr(fid_mod, "fid", fake_fid)
    ckpt = str(tmp_path / "run")
    assert run_cli(["sample", "--ckpt", ckpt, "--out", str(tmp_path / "s")])[0] == 0
    assert run_cli(["align", "--ckpt", ckpt])[0] == 0
    assert run_cli(["fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz")])[0] == 0
    assert seen == {"sample": SampleConfig(), "align": AlignConfig(), "fid": FidConfig()}
    assert run_cli(["sample", "--ckpt", ckpt, "--out", str(tmp_path / "s"), "--num", "8", "--cfg", "1.8",
                    "--guidance-interval", "0.1,0.6", "--class", "3", "--class", "5", "--heun", "--sampler", "ode",
                    "--vae", "/vae", "--grid", "0"])[0] == 0
    assert seen["sample"] == SampleConfig(num=8, cfg_scale=1.8, guidance_interval=(0.1, 0.6), classes=(3, 5), heun=True,
                                          sampler="ode", vae="/vae", grid=0)
