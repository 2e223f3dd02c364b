"""The CLI as users run it: a subprocess, real exit codes, no tracebacks for user mistakes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vlmlab", *args], capture_output=True, text=True, timeout=120)


def test_plan_all_json_covers_every_family() -> None:
    from vlmlab.families import FAMILIES

    out = run("plan", "--model", "all", "--image", "1920x1080", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["rows"]
    assert [r["family"] for r in rows] == FAMILIES.names()
    pixtral = rows[0]
    assert pixtral["image_tokens"] == [2340] and pixtral["grids"] == ["36x64"]


def test_plan_table_reads_image_file_header(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    Image.new("RGB", (640, 480), "blue").save(path)
    out = run("plan", "--model", "pixtral", "--image", str(path), "--image", "1024x1024", "--gpu-mem", "80GiB")
    assert out.returncode == 0, out.stderr
    assert "1230 (30x40) + 4160 (64x64)" in out.stdout
    assert "fits 80.0 GiB" in out.stdout


def test_user_mistakes_exit_2_with_a_message_not_a_traceback() -> None:
    cases = [
        (["plan", "--model", "gpt5", "--image", "10x10"], "unknown model family 'gpt5'"),
        (["plan", "--model", "pixtral", "--image", "10x10", "--opt", "num_crops=4"], "unknown option 'num_crops'"),
        (["plan", "--model", "pixtral", "--image", "10x10", "--opt", "variant"], "must look like NAME=VALUE"),
        (["plan", "--model", "pixtral", "--image", "10x10", "--gpu-mem", "lots"], "cannot read memory size 'lots'"),
        (["plan", "--model", "pixtral", "--image", "10x10", "--opt", "variant=torch"], "must be one of 'mistral', 'hf'"),
    ]
    for args, message in cases:
        out = run(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert message in " ".join(out.stderr.split()), (args, out.stderr)
        assert "Traceback" not in out.stderr


def test_import_and_help_stay_light() -> None:
    code = "import sys, vlmlab.cli, vlmlab.plan; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]"
    assert run("--help").returncode == 0


def test_nano_train_grows_a_checkpoint_and_trains_it(tmp_path: Path) -> None:
    """`vlmlab nano train --grow-from`: a new run starts from the packaged checkpoint with a deeper
    vision tower, trains a step and exports; bad --arch / missing vision_layers exit 2."""
    from vlmlab.nano import checkpoint_path

    shipped = json.loads((checkpoint_path() / "config.json").read_text())["vision_config"]["num_hidden_layers"]
    out = run("nano", "train", "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2", "--threads", "1",
              "--eval-n", "10", "--tasks", "color", "--grow-from", str(checkpoint_path()),
              "--arch", f"vision_layers={shipped + 1}", "--export", str(tmp_path / "final"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout.strip().splitlines()[-1])["accuracy"]) == {"color", "mean"}
    grown = json.loads((tmp_path / "final" / "config.json").read_text())
    assert grown["vision_config"]["num_hidden_layers"] == shipped + 1
    assert grown["vlmlab_family"] == "nano"
    for args, message in [
        (["--grow-from", str(checkpoint_path())], "--grow-from needs --arch vision_layers=N"),
        (["--arch", "vision_layers=two"], "bad --arch item 'vision_layers=two'"),
    ]:
        bad = run("nano", "train", "--out", str(tmp_path / "bad"), "--steps", "1", *args)
        assert bad.returncode == 2, (args, bad.stderr)
        assert message in " ".join(bad.stderr.split()) and "Traceback" not in bad.stderr
