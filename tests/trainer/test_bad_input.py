"""Each bad input: a one-line error naming the problem, exit code != 0, no output folder."""

from __future__ import annotations

import pytest
from trainer_helpers import BASE_ARGS, make_images

pytestmark = pytest.mark.trainer


def _corrupt(folder):
    make_images(folder, count=2)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")


def _checkpointless(tmp_path):
    (tmp_path / "no-checkpoints").mkdir()
    return ["--resume-from-checkpoint", str(tmp_path / "no-checkpoints")]


CASES = {
    "empty-folder": (lambda d: d.mkdir(), [], "is empty"),
    "no-image-files": (
        lambda d: (d.mkdir(), (d / "notes.txt").write_text("hi"), (d / "x.gif").write_bytes(b"G")),
        [], "has no image files"),
    "missing-folder": (lambda d: None, [], "does not exist"),
    "corrupt-image": (_corrupt, [], "cannot read image"),
    "token-in-vocabulary": (make_images, ["--placeholder-token", "photo"],
                            "already in the tokenizer's vocabulary"),
    "initializer-tokenizes-to-nothing": (make_images, ["--initializer-token", "   "],
                                         "tokenizes to nothing"),
    "resolution-not-multiple-of-8": (make_images, ["--resolution", "60"], "multiple of 8"),
    "unknown-model-path": (make_images, ["--model", "/nonexistent/models/sd"],
                           "does not exist"),
    "unknown-hub-model-offline": (make_images, ["--model", "nobody/no-such-model"],
                                  "nobody/no-such-model"),
    "resume-path-without-checkpoint": (make_images, "checkpointless", "no checkpoint found"),
    "missing-initial-embedding": (make_images, ["--initial-embedding", "/nonexistent/e.pt"],
                                  "initial embedding file"),
    "ipex-not-importable": (make_images, ["--accelerator", "ipex"],
                            "intel_extension_for_pytorch"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, capsys, monkeypatch,
                                                  tiny_model):
    from amxtune_trainer.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prepare, extra, expected = CASES[case]
    data = tmp_path / "data"
    prepare(data)
    if extra == "checkpointless":
        extra = _checkpointless(tmp_path)
    out = tmp_path / "out"
    argv = ["textual-inversion", *BASE_ARGS, "--train-data-dir", str(data),
            "--output-dir", str(out), "--max-train-steps", "2", *extra]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse/pydantic errors exit through argparse
        code = exit_.code
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert code not in (0, None)
    assert len(errors) == 1, captured.err
    assert expected in errors[0], errors[0]
    assert "Traceback" not in captured.err
    assert not out.exists()
    assert captured.out == ""
