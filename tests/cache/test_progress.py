"""Progress reporting and the size formatter: values, non-terminal status lines, and -q on real commands."""

from __future__ import annotations

import io
import math
import re
import shutil

import pytest

from repa_cache.cache.progress import Progress, format_bytes, format_duration


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (50.8 * 1024, "50.8 KiB"),
        (1023.96 * 1024, "1.0 MiB"),  # would print as "1024.0 KiB"
        (3 * 2**20 + 2**19, "3.5 MiB"),
        (5 * 2**30, "5.0 GiB"),
        (7 * 2**40, "7.0 TiB"),
        (3 * 2**50, "3.0 PiB"),
        (4096 * 2**50, "4096.0 PiB"),  # the last unit takes any value
    ],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize(("s", "text"), [(0, "0:00"), (59.4, "0:59"), (61, "1:01"), (3725, "1:02:05"), (math.inf, "?"), (-1, "?")])
def test_format_duration(s, text):
    assert format_duration(s) == text


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_status_lines_at_each_tenth_and_at_the_end():
    out = io.StringIO()
    with Progress(20, "work", "img", stream=out, every_s=1e9) as bar:
        assert bar.mode == "lines"
        for _ in range(20):
            bar.update(1)
    lines = _lines(out)
    assert [ln.split(",")[0] for ln in lines] == [f"work: {n}/20 img ({5 * n}%)" for n in range(2, 21, 2)]
    assert all(re.search(r", [\d.]+ img/s, elapsed \d+:\d\d, ETA (\d+:\d\d|\?)$", ln) for ln in lines[:-1])
    assert re.search(r", [\d.]+ img/s, elapsed \d+:\d\d$", lines[-1])  # no ETA once done


def test_status_line_by_time_and_rate_counts_only_this_run():
    out = io.StringIO()
    bar = Progress(1000, "copy", "shards", stream=out, every_s=0.0, initial=400)
    bar.update(1)
    bar.update(1)
    bar.close()
    lines = _lines(out)
    assert [ln.split(" (")[0] for ln in lines] == ["copy: 401/1000 shards", "copy: 402/1000 shards", "copy: 402/1000 shards"]
    assert bar.status().startswith("copy: 402/1000 shards (40%), ")


def test_quiet_and_failure_write_nothing_more():
    out = io.StringIO()
    with Progress(10, "x", stream=out, quiet=True) as bar:
        bar.update(10)
    assert out.getvalue() == ""
    with Progress(0, "x", stream=out) as bar:  # nothing to do: nothing to report
        pass
    assert out.getvalue() == ""
    with pytest.raises(RuntimeError), Progress(10, "x", "it", stream=out, every_s=1e9) as bar:
        bar.update(1)
        raise RuntimeError
    lines = _lines(out)  # the line of the first tenth, and no final line after the failure
    assert len(lines) == 1 and lines[0].startswith("x: 1/10 it (10%), ")


def test_terminal_gets_a_bar_not_lines():
    out = _Tty()
    with Progress(4, "verify", "shards", stream=out) as bar:
        assert bar.mode == "bar"
        bar.update(4)
    text = out.getvalue()
    assert "verify" in text and "4/4" in text and "elapsed" not in text


def test_own_output_goes_to_its_stream_beside_the_bar_or_the_lines():
    for stream in (_Tty(), io.StringIO()):
        own = io.StringIO()
        with Progress(3, "train", "step", stream=stream) as bar:
            bar.update(2)
            bar.write("step 2/3 loss 1.0", own)
        assert own.getvalue() == "step 2/3 loss 1.0\n" and "loss" not in stream.getvalue()


def test_training_reports_progress_lines_on_stderr_and_its_status_on_stdout(tiny_cache, tmp_path, capsys):
    from repa_cache.train.config import TrainConfig
    from repa_cache.train.loop import train

    train(TrainConfig(cache=str(tiny_cache), out=str(tmp_path / "r"), model="SiT-tiny/2", batch_size=8, max_steps=2,
                      ckpt_every=2, log_every=1, num_workers=0, device="cpu"))
    out, err = capsys.readouterr()
    assert [ln.split(" loss")[0] for ln in out.splitlines()] == ["step 1/2", "step 2/2"]
    lines = [ln for ln in err.splitlines() if ln.startswith("train: ")]
    assert re.match(r"train: 1/2 step \(50%\), [\d.]+ step/s, elapsed \d+:\d\d, ETA ", lines[0])
    assert re.match(r"train: 2/2 step \(100%\), [\d.]+ step/s, elapsed \d+:\d\d$", lines[-1])


def test_verify_and_copy_status_lines_and_quiet(tiny_cache, tmp_path, run_cli):
    code, out, err = run_cli(["verify", str(tiny_cache)])
    assert code == 0 and out.startswith("ok: 6 shards")
    lines = err.splitlines()
    assert [ln.split(",")[0] for ln in lines] == [f"verify: {n}/6 shards ({round(100 * n / 6)}%)" for n in range(1, 7)]
    code, out, err = run_cli(["verify", str(tiny_cache), "-q"])
    assert code == 0 and err == ""

    code, out, err = run_cli(["cache", "copy", str(tiny_cache), str(tmp_path / "c")])
    assert code == 0, err
    assert "copy latents: 3/3 shards (100%)" in err and "copy teachers/tiny: 3/3 shards (100%)" in err
    copied = sum(f.stat().st_size for g in ("latents", "teachers/tiny") for f in (tmp_path / "c" / g).rglob("c/**/*") if f.is_file())
    assert f"6 shards ({format_bytes(copied)})" in out and " MB" not in out
    shutil.rmtree(tmp_path / "c")
    code, out, err = run_cli(["cache", "copy", str(tiny_cache), str(tmp_path / "c"), "-q"])
    assert code == 0 and err == ""


def test_export_wds_status_lines_and_quiet(tiny_cache, tmp_path, run_cli):
    code, out, err = run_cli(["export-wds", str(tiny_cache), str(tmp_path / "w")])
    assert code == 0, err
    assert err.splitlines()[-1].startswith("export-wds: 22/22 samples (100%), ")
    tar_bytes = sum(f.stat().st_size for f in (tmp_path / "w").glob("*.tar"))
    assert f"({format_bytes(tar_bytes)}; groups: latents, teachers/tiny)" in out
    code, out, err = run_cli(["export-wds", str(tiny_cache), str(tmp_path / "w2"), "-q"])
    assert code == 0 and err == ""


def test_precompute_counts_images_not_shards(demo_images, tmp_path, capsys):
    from repa_cache.pipeline.precompute import precompute

    from ..conftest import tiny_config

    precompute(tiny_config(demo_images, tmp_path / "c", quiet=False))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("precompute: ")]
    # 22 inputs in shards of 8, 8 and 6, counted as each shard finishes (in any order).
    assert [ln.split(" (")[0] for ln in lines][-1] == "precompute: 22/22 img"
    assert all(re.match(r"precompute: (6|8|14|16)/22 img \(\d+%\), [\d.]+ img/s, elapsed \d+:\d\d, ETA ", ln) for ln in lines[:-1])
    assert len(lines) == 3
