"""``rge demo --tiny`` runs the whole pipeline offline and prints the scores the API computes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rge
from rge import RGECheckpointError, RGEEncoder, __version__
from rge.cli import DEMO_CANDIDATES, DEMO_QUERY, demo_picture, main
from rge.cli.errors import EXIT_MISSING_EXTRA, EXIT_MODEL, CLIError
from rge.testing import build_tiny_checkpoint

from .live_server import free_port


def test_demo_tiny_prints_the_api_scores(capsys, tmp_path):
    assert main(["demo", "--tiny", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    printed = [float(m) for m in re.findall(r"^(-?\d\.\d{4})  Summarize", out, flags=re.M)]
    assert len(printed) == 2
    assert "rationale:" in out

    encoder = RGEEncoder.from_pretrained(build_tiny_checkpoint(tmp_path), device="cpu")
    query = encoder.encode_query(DEMO_QUERY, images=[demo_picture()])
    expected = encoder.similarity(query, encoder.encode_document(DEMO_CANDIDATES))[0]
    assert printed == pytest.approx([round(float(s), 4) for s in expected], abs=1.5e-4)


def test_demo_needs_a_command(capsys):
    with pytest.raises(SystemExit):
        main([])


@pytest.mark.parametrize("bad", ["0", "-1", "x", "nan"])
def test_bad_repetition_penalty_is_one_line_and_status_2(capsys, tmp_path, bad):
    with pytest.raises(SystemExit) as exit_info:
        main(["encode", str(tmp_path / "c.jsonl"), "--output", str(tmp_path / "o"), "--repetition-penalty", bad])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--repetition-penalty" in error and "Traceback" not in error
    assert not (tmp_path / "o").exists()


def _one_line_error(capsys, argv, status: int) -> str:
    """Run ``rge argv``: it must exit with ``status`` and say why in exactly one line on stderr."""
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's own refusals
        code = exit_info.code
    captured = capsys.readouterr()
    assert code == status, captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_demo_without_network_or_cache_says_what_to_do(tmp_path):
    """A real process: exactly one line on stderr, naming the model and suggesting --tiny."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "rge.cli", "demo"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)  # fmt: skip
    assert done.returncode == EXIT_MODEL
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "MCG-NJU/RGE" in lines[0] and "--tiny" in lines[0] and "no cached copy" in lines[0]


@pytest.mark.parametrize(
    ("argv", "status", "said"),
    [
        (["demo", "--model", "./no-such-checkpoint"], EXIT_MODEL, "not a checkpoint directory"),
        (["demo", "--tiny", "--device", "cuda:7" if torch.cuda.is_available() else "cuda"], 2, "CUDA"),
        (["demo", "--tiny", "--device", "tpu"], 2, "--device"),
        (["eval", "mmeb", "--data", ".", "--images", ".", "--output", "o", "--dtype", "float33"], 2, "dtype"),
        (["eval", "mmeb", "--data", ".", "--images", ".", "--output", "o", "--dtype", "int8"], 2, "floating"),
        (["encode", "c.jsonl", "--output", "o", "--batch-size", "0"], 2, "--batch-size"),
        (["encode", "c.jsonl", "--output", "o", "--shard-size", "0"], 2, "--shard-size"),
        (["encode", "c.jsonl", "--output", "o", "--min-pixels", "9000", "--max-pixels", "10"], 2, "--min-pixels"),
        (["encode", "missing.jsonl", "--output", "o"], 2, "not found"),
        (["encode", "c.csv", "--output", "o"], 2, "not JSONL or parquet"),
        (["encode", "c.jsonl", "--output", "a-file"], 2, "is a file"),
        (["eval", "mmeb", "--data", ".", "--images", "no-such-folder", "--output", "o"], 2, "--images"),
        (["eval", "mmeb", "--data", ".", "--images", ".", "--output", "a-file"], 2, "is a file"),
    ],
)
def test_user_errors_are_one_line_with_a_documented_status(capsys, tmp_path, monkeypatch, argv, status, said):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.jsonl").write_text('{"id": 1, "text": "a"}\n')
    (tmp_path / "c.csv").write_text("id,text\n1,a\n")
    (tmp_path / "a-file").write_text("keep me")
    before = sorted(p.name for p in tmp_path.iterdir())
    line = _one_line_error(capsys, argv, status)
    assert said in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing left behind
    assert (tmp_path / "a-file").read_text() == "keep me"


def test_a_misspelt_model_says_it_is_neither_a_folder_nor_on_the_hub(capsys, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    line = _one_line_error(capsys, ["demo", "--model", "tyni"], EXIT_MODEL)
    assert line.startswith(
        f"rge demo: model 'tyni' is not a local folder (no such directory: {tmp_path / 'tyni'}) and cannot be "
        "downloaded from the hub: HF_HUB_OFFLINE is set and there is no cached copy."
    )
    assert line.endswith("or try the offline pipeline with `rge demo --tiny`")


@pytest.mark.parametrize(
    ("argv", "module", "said"),
    [
        (["serve", "--ray", "--port", "PORT"], "ray.serve",
         'rge serve: serving with Ray Serve needs ray: pip install "rge-embeddings[ray]"'),
        (["serve", "--port", "PORT"], "fastapi",
         'rge serve: the server needs fastapi: pip install "rge-embeddings[serve]"'),
        (["encode", "c.jsonl", "--output", "o", "--ray", "--ignore-fields", "query,positive"], "ray.data",
         'rge encode: rge.integrations.ray needs ray: pip install "rge-embeddings[ray]"'),
        (["train", "--data", "c.jsonl", "--output", "o", "--lora"], "peft",
         'rge train: LoRA training needs peft: pip install "rge-embeddings[train]"'),
    ],
)  # fmt: skip
def test_a_missing_extra_is_one_line_with_the_pip_command_and_status_5(capsys, tmp_path, monkeypatch, argv, module,
                                                                       said):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.jsonl").write_text('{"id": 1, "text": "a", "query": "q", "positive": "p"}\n')
    monkeypatch.setitem(sys.modules, module, None)  # makes "import module" fail, as when it is not installed
    for imported_once in ("rge.serving.ray_serve", "rge.integrations.ray"):  # imported again, as a first time
        monkeypatch.delitem(sys.modules, imported_once, raising=False)
    monkeypatch.setattr("rge.encoder.RGEEncoder.from_pretrained", _never_called)
    argv = [str(free_port()) if arg == "PORT" else arg for arg in argv]
    assert _one_line_error(capsys, [*argv, "--model", str(tmp_path / "never-loaded")], EXIT_MISSING_EXTRA) == said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]  # nothing written


def test_an_index_of_other_settings_is_refused_before_loading_and_left_as_it_was(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.jsonl").write_text('{"id": 1, "text": "a"}\n')
    (tmp_path / "o").mkdir()
    manifest = json.dumps({"model": "other", "side": "document"})
    (tmp_path / "o" / "manifest.json").write_text(manifest)
    monkeypatch.setattr("rge.encoder.RGEEncoder.from_pretrained", _never_called)
    line = _one_line_error(capsys, ["encode", "c.jsonl", "--output", "o", "--model", "./x"], 2)
    assert "other settings" in line and "'model': ('other', './x')" in line
    assert (tmp_path / "o" / "manifest.json").read_text() == manifest
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["manifest.json"]


def _never_called(*args, **kwargs):
    raise AssertionError("the model was loaded before the arguments were checked")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"rge {__version__} (rge-embeddings)"


def test_python_dash_m_rge_is_the_rge_command():
    root = Path(rge.__file__).resolve().parents[1]  # `python -m` imports from the working folder first
    done = subprocess.run([sys.executable, "-m", "rge", "--version"], capture_output=True, text=True, timeout=120,
                          cwd=root)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"rge {__version__} (rge-embeddings)"


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    """With --debug (or RGE_DEBUG=1) the error propagates, chained to the original one."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CLIError) as raised:
        main(["demo", "--model", "./no-such-checkpoint", "--debug"])
    assert isinstance(raised.value.__cause__, RGECheckpointError)
    monkeypatch.setenv("RGE_DEBUG", "1")
    with pytest.raises(CLIError):
        main(["demo", "--model", "./no-such-checkpoint"])


def test_unexpected_errors_are_one_line_and_point_to_debug(capsys, monkeypatch):
    def broken(args):
        raise KeyError("internal")

    monkeypatch.setattr("rge.cli.run_demo", broken)
    line = _one_line_error(capsys, ["demo", "--tiny"], 1)
    assert "KeyError" in line and "--debug" in line


def test_transformers_progress_bars_are_quiet_unless_verbose(capsys):
    assert main(["demo", "--tiny", "--device", "cpu"]) == 0
    assert "Loading weights" not in capsys.readouterr().err
