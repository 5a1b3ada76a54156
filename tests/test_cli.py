"""The train and eval commands as a user runs them (subprocesses of ``python -m``): a resume
keeps the run's own options, output folders are protected, bad input ends in one
``prog: error:`` line (never a traceback), Ctrl-C says where the last checkpoint is, and a
run that fails before training leaves nothing behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

SMALL = ["--synthetic-size", "small", "--batch-size", "12", "--num-workers", "0", "--mb-batch", "1",
         "--num-neighbors", "4", "--temporal-layers", "1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment of the commands: the small embedded dataset in a folder of its own
    (generated once here), tracebacks off, the package importable from anywhere."""
    root = tmp_path_factory.mktemp("clidata")
    e = {k: v for k, v in os.environ.items() if k not in ("NBRETR_TRACEBACK", "NBRETR_BACKEND")}
    e["NBRETR_DATA"] = str(root)
    e["PYTHONUNBUFFERED"] = "1"
    import nbretr  # the commands import the same nbretr as these tests
    e["PYTHONPATH"] = os.pathsep.join([str(Path(nbretr.__file__).parents[1]), e.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, "-m", "nbretr.data.synthetic", "--root", str(root / "synthetic"),
                    "--size", "small"], check=True, env=e, capture_output=True, cwd=tmp_path_factory.mktemp("cwd"))
    return e


def run(args: list[str], env: dict, cwd: Path, module: str = "nbretr.train", timeout: float = 600,
        extra_env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**env, **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], env=e, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def assert_user_error(p: subprocess.CompletedProcess, *needles: str, prog: str = "python -m nbretr.train"):
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert f"{prog}: error:" in p.stderr, p.stderr[-3000:]
    for n in needles:
        assert n in p.stderr, (n, p.stderr[-3000:])


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_keeps_the_runs_own_options(env, tmp_path):
    """Started with --epochs 3 and stopped after 3 steps, the run resumed with no options
    but a new stop point goes on with epochs 3 and the same learning-rate schedule as an
    uninterrupted run; --epochs given again with another value is an error."""
    a, b = tmp_path / "a", tmp_path / "b"
    p = run([*SMALL, "--epochs", "3", "--lr", "3e-3", "--max-steps", "3", "--do-eval", "false", "--output-dir", str(a)], env, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "recipe nbretr, preset embedded" in p.stderr  # the synthetic set's preset is said, not silent
    before = (a / "config.yaml").read_text()
    p = run(["--resume", str(a), "--max-steps", "5"], env, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (a / "config.yaml").read_text() == before            # not rewritten with other options
    assert yaml.safe_load(before)["epochs"] == 3
    p = run([*SMALL, "--epochs", "3", "--lr", "3e-3", "--max-steps", "5", "--do-eval", "false",
             "--output-dir", str(b)], env, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    ra, rb = records(a), records(b)
    assert [r["step"] for r in ra] == [1, 2, 3, 4, 5]
    assert [r["lr"] for r in ra] == [r["lr"] for r in rb]        # the warm-up did not restart
    assert [round(r["loss"], 5) for r in ra] == [round(r["loss"], 5) for r in rb]
    p = run(["--resume", str(a), "--epochs", "12"], env, tmp_path)
    assert_user_error(p, "--epochs 12", "(the run has 3)", "may change on resume")
    p = run(["--resume", str(a), "--output-dir", str(tmp_path / "elsewhere")], env, tmp_path)
    assert_user_error(p, "writes into its own folder")


def test_a_folder_that_holds_a_run_is_refused_and_a_busy_one_locked(env, tmp_path):
    out = tmp_path / "run"
    p = run([*SMALL, "--epochs", "1", "--max-steps", "2", "--do-eval", "false", "--output-dir", str(out)],
            env, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = (out / "checkpoints" / "last.pt").read_bytes()
    lines = (out / "metrics.jsonl").read_text()
    p = run([*SMALL, "--epochs", "1", "--max-steps", "1", "--do-eval", "false", "--output-dir", str(out)],
            env, tmp_path)
    assert_user_error(p, f"--output-dir {out} already holds a run", f"--resume {out}")
    assert (out / "checkpoints" / "last.pt").read_bytes() == ckpt
    assert (out / "metrics.jsonl").read_text() == lines

    from nbretr.runtime import FolderLock
    busy = tmp_path / "busy"
    busy.mkdir()
    lock = FolderLock(busy)
    try:
        p = run([*SMALL, "--epochs", "1", "--max-steps", "1", "--output-dir", str(busy)], env, tmp_path)
        assert_user_error(p, f"--output-dir {busy} is in use by pid {os.getpid()}")
    finally:
        lock.release()
    assert not (busy / "config.yaml").exists()


def test_eval_writes_its_own_files_and_checks_its_options(env, tmp_path):
    out = tmp_path / "run"
    p = run([*SMALL, "--epochs", "1", "--max-steps", "2", "--eval-k", "20", "--output-dir", str(out)], env, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    own = (out / "metrics.json").read_bytes()
    # 16 test videos and k=20: the hubness measures are undefined, and the report says why
    assert "note, text->video hubness: undefined: the gallery has 16 item(s)" in p.stdout
    p = run(["--checkpoint", str(out)], env, tmp_path, module="nbretr.eval")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "metrics.json").read_bytes() == own          # the run's own results are kept
    evals = list((out / "evals").glob("*/metrics.json"))
    assert len(evals) == 1 and (evals[0].parent / "nk_histogram.png").is_file()
    assert json.loads(evals[0].read_text())["checkpoint"].endswith("last.pt")
    p = run(["--checkpoint", str(out), "--output-dir", str(evals[0].parent)], env, tmp_path, module="nbretr.eval")
    assert_user_error(p, "already holds an evaluation", prog="python -m nbretr.eval")
    p = run(["--checkpoint", str(out), "--k", "0"], env, tmp_path, module="nbretr.eval")
    assert p.returncode == 2 and "--k must be at least 1, got 0" in p.stderr, p.stderr[-2000:]
    p = run(["--checkpoint", str(out)], env, tmp_path, module="nbretr.eval", extra_env={"NBRETR_BACKEND": "bogus"})
    assert p.returncode == 2 and "NBRETR_BACKEND='bogus' is not a backend" in p.stderr, p.stderr[-2000:]


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(env, tmp_path):
    out = tmp_path / "run"
    p = run([*SMALL, "--epochs", "1", "--max-steps", "2", "--save-every", "1", "--do-eval", "false",
             "--output-dir", str(out)], env, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    last, prev = out / "checkpoints" / "last.pt", out / "checkpoints" / "previous.pt"
    assert prev.is_file()
    last.write_bytes(last.read_bytes()[:1000])                 # a copy cut short
    p = run(["--checkpoint", str(out)], env, tmp_path, module="nbretr.eval")
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"checkpoint {last} is unreadable" in p.stderr and f"previous checkpoint {prev}" in p.stderr
    p = run(["--resume", str(out), "--max-steps", "3"], env, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "falling back to the previous checkpoint" in p.stderr
    for f in (last, prev):
        f.write_bytes(b"not a checkpoint")
    p = run(["--resume", str(out)], env, tmp_path)
    assert_user_error(p, f"checkpoint {last} is unreadable")
    p = run(["--checkpoint", str(out)], env, tmp_path, module="nbretr.eval")
    assert_user_error(p, f"checkpoint {last} is unreadable", prog="python -m nbretr.eval")


def test_bad_options_are_errors_not_ignored(env, tmp_path):
    p = run([*SMALL, "--clip-path", str(tmp_path / "nothing")], env, tmp_path)
    assert_user_error(p, "--clip-path", "--clip is tiny")
    p = run(SMALL, env, tmp_path, extra_env={"NBRETR_BACKEND": "bogus"})
    assert_user_error(p, "NBRETR_BACKEND='bogus' is not a backend")
    p = run([*SMALL, "--backend", "ext"], env, tmp_path, extra_env={"NBRETR_DISABLE_EXT": "1"})
    assert_user_error(p, "--backend ext: the C++/CUDA extension is not loaded")
    text = tmp_path / "clip.pt"
    text.write_text("this is not a checkpoint\n" * 10)
    pickle = tmp_path / "pickle.pt"  # a pickle that weights_only refuses (an arbitrary class)
    import argparse

    import torch
    torch.save({"args": argparse.Namespace(lr=1)}, pickle)
    for bad in (text, pickle):
        p = run([*SMALL, "--clip", "ViT-B/32", "--clip-path", str(bad), "--tokenizer-path", str(bad)],
                env, tmp_path)
        assert_user_error(p, str(bad))
        assert "weights_only" not in p.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_backend_from_the_environment_reaches_the_run(env, tmp_path):
    out = tmp_path / "run"
    p = run([*SMALL, "--epochs", "1", "--max-steps", "1", "--do-eval", "false", "--output-dir", str(out)],
            env, tmp_path, extra_env={"NBRETR_BACKEND": "torch"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert yaml.safe_load((out / "config.yaml").read_text())["backend"] == "torch"
    assert "backend torch" in p.stderr


def test_ctrl_c_saves_and_says_how_to_resume(env, tmp_path):
    out = tmp_path / "run"
    e = {**env}
    proc = subprocess.Popen([sys.executable, "-m", "nbretr.train", *SMALL, "--epochs", "50", "--output-dir",
                             str(out)], env=e, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    jsonl = out / "metrics.jsonl"
    while time.time() < deadline and not (jsonl.exists() and jsonl.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("python -m nbretr.train: interrupted at step "), last_line
    assert f"last checkpoint {out / 'checkpoints' / 'last.pt'}" in last_line
    assert f"python -m nbretr.train --resume {out}" in last_line
    step = int(last_line.split("at step ")[1].split(";")[0])
    assert records(out)[-1]["step"] == step
    import torch
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["global_step"] == step


def test_a_run_that_fails_before_training_leaves_no_folder(env, tmp_path):
    p = run([*SMALL, "--batch-size", "1000"], env, tmp_path)  # found only once the data is read
    assert_user_error(p, "--batch-size 1000 is larger than the training set")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), \
        list((tmp_path / "runs").rglob("*"))
    root = tmp_path / "msrvtt"
    root.mkdir()
    (root / "MSRVTT_data.json").write_text('{"sentences": [{"video_id": "video0", "capt')
    (root / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\n")
    (root / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\n")
    p = run(["--dataset", "msrvtt", "--data-root", str(root), "--num-workers", "0"], env, tmp_path)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), \
        list((tmp_path / "runs").rglob("*"))
