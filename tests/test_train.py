"""python -m nbretr.train / nbretr.eval end to end on the small embedded dataset:
config precedence, resume equals an uninterrupted run, eval's report and PNG."""
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from nbretr import config as C


@pytest.fixture(scope="module")
def data_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("nbdata")
    old = os.environ.get("NBRETR_DATA")
    os.environ["NBRETR_DATA"] = str(root)
    yield root
    if old is None:
        os.environ.pop("NBRETR_DATA", None)
    else:
        os.environ["NBRETR_DATA"] = old


SMALL = ["--synthetic-size", "small", "--batch-size", "12", "--num-workers", "0", "--mb-batch", "1",
         "--num-neighbors", "4", "--temporal-layers", "1"]


def _losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_config_precedence_and_errors(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(yaml.safe_dump({"lr": 0.5, "epochs": 3, "beta": 0.1}))
    parser = C.build_parser("t")
    cfg = C.resolve_config(parser.parse_args(["--config", str(y), "--epochs", "4", "--num_neighbors", "7"]))
    assert (cfg.lr, cfg.epochs, cfg.beta, cfg.num_neighbors) == (0.5, 4, 0.1, 7)   # CLI > YAML > preset
    assert cfg.batch_size == C.EMBEDDED_DEFAULTS["batch_size"]                     # synthetic preset
    ref = C.resolve_config(parser.parse_args(["--dataset", "msrvtt", "--clip", "ViT-B/32", "--clip-path", "x.pt"]))
    assert (ref.batch_size, ref.lr, ref.coef_lr, ref.epochs, ref.mb_batch) == (128, 1e-4, 1e-3, 5, 15)  # MSR-VTT's
    assert (ref.centrality_scale, ref.num_neighbors, ref.temperature, ref.beta) == (0.3, 20, 3.0, 0.7)
    y.write_text(yaml.safe_dump({"learning_rate": 1}))
    with pytest.raises(ValueError, match="unknown option\\(s\\) \\['learning_rate'\\]"):
        C.resolve_config(parser.parse_args(["--config", str(y)]))
    with pytest.raises(FileNotFoundError, match="--config: no such file"):
        C.resolve_config(parser.parse_args(["--config", str(tmp_path / "none.yaml")]))
    with pytest.raises(ValueError, match="--clip ViT-B/32 needs --clip-path"):
        C.resolve_config(parser.parse_args(["--clip", "ViT-B/32"]))
    assert C.resolve_config(parser.parse_args(["--baseline"])).baseline is True


@pytest.mark.slow
def test_commands_report_user_errors_without_a_traceback(tmp_path, capsys, monkeypatch):
    """A missing dataset folder or checkpoint ends `python -m nbretr.train` / `.eval` with
    `prog: error: message` and status 2; NBRETR_TRACEBACK=1 raises it instead."""
    import subprocess
    import sys

    from nbretr import eval as E
    from nbretr import train as T
    from nbretr.runtime import run_cli
    missing = tmp_path / "nowhere"
    monkeypatch.chdir(tmp_path)  # the run folder would go to ./runs
    assert run_cli(T.main, "python -m nbretr.train", ["--dataset", "msrvtt", "--data-root", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"python -m nbretr.train: error: msrvtt: dataset folder {missing} does not exist" in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no empty run left
    out = tmp_path / "given"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a folder with the user's files in it is kept
    assert run_cli(T.main, "prog", ["--dataset", "msrvtt", "--data-root", str(missing),
                                    "--output-dir", str(out)]) == 2
    assert (out / "notes.txt").exists()
    assert run_cli(E.main, "python -m nbretr.eval", ["--checkpoint", str(missing / "last.pt")]) == 2
    assert f"python -m nbretr.eval: error: checkpoint not found: {missing / 'last.pt'}" in capsys.readouterr().err
    monkeypatch.setenv("NBRETR_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        run_cli(E.main, "python -m nbretr.eval", ["--checkpoint", str(missing / "last.pt")])
    monkeypatch.delenv("NBRETR_TRACEBACK")

    def library_bug(argv):  # a ValueError raised inside another library keeps its traceback
        import json as js
        return js.loads("{not json")
    with pytest.raises(ValueError):
        run_cli(library_bug, "prog", [])
    r = subprocess.run([sys.executable, "-m", "nbretr.eval", "--checkpoint", str(missing)], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(Path(E.__file__).parents[1])})
    assert r.returncode == 2 and "python -m nbretr.eval: error: checkpoint not found" in r.stderr, r.stderr


def test_every_model_option_reaches_the_model():
    """TrainConfig extends the model's NeighborRetrConfig, so each method and architecture
    option is a command-line flag with the model's default, typed by its annotation, and
    arrives in the model's configuration; bad values are refused by the model's checks."""
    import dataclasses
    from nbretr.models import NeighborRetrConfig
    parser = C.build_parser("t")
    flags = {a.dest for a in parser._actions}
    model_defaults = NeighborRetrConfig()
    run_defaults = C.TrainConfig()
    for f in dataclasses.fields(NeighborRetrConfig):
        if f.name in C.DERIVED:
            continue
        assert f.name in flags, f.name
        if f.name not in ("image_size", "backend") and f.name not in C.RECIPE_FIELDS:  # run defaults, documented
            assert getattr(run_defaults, f.name) == getattr(model_defaults, f.name), f.name
    cfg = C.resolve_config(parser.parse_args(["--centrality-k", "5", "--nbi-normalize-over", "neighbors",
                                              "--cluster-k", "2", "--text-cluster-ratio", "0.5",
                                              "--cluster-mlp", "false"]))
    m = cfg.model_config(vocab_size=99)
    assert (m.centrality_k, m.nbi_normalize_over, m.cluster_k, m.text_cluster_ratio, m.cluster_mlp,
            m.vocab_size) == (5, "neighbors", 2, 0.5, False, 99)
    assert type(m.centrality_k) is int and type(m.text_cluster_ratio) is float
    with pytest.raises(ValueError, match="nbi_normalize_over must be 'complement' or 'neighbors', got 'all'"):
        C.resolve_config(parser.parse_args(["--nbi-normalize-over", "all"]))
    with pytest.raises(ValueError, match="centrality must be 'mean' or 'knn', got 'max'"):
        C.resolve_config(parser.parse_args(["--centrality", "max"]))


@pytest.mark.slow
def test_resume_continues_the_loss_curve(data_env, tmp_path):
    from nbretr.train import main
    args = SMALL + ["--epochs", "3", "--do-eval", "false", "--seed", "3"]
    assert main(args + ["--max-steps", "7", "--output-dir", str(tmp_path / "full")]) == 0
    full = _losses(tmp_path / "full")
    assert [r["step"] for r in full] == list(range(1, 8))
    # stop mid-epoch (3 steps per epoch), then resume to the same end
    assert main(args + ["--max-steps", "4", "--output-dir", str(tmp_path / "cut")]) == 0
    state = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 1, 4)
    assert main(args + ["--max-steps", "7", "--resume", str(tmp_path / "cut")]) == 0
    resumed = _losses(tmp_path / "cut")
    assert [r["step"] for r in resumed] == list(range(1, 8))
    for a, b in zip(full, resumed):
        for key in ("loss", "wti", "nbi", "opt", "kl", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)


@pytest.mark.slow
def test_train_then_eval_with_corrections(data_env, tmp_path, capsys):
    from nbretr import eval as E
    from nbretr.train import main
    run = tmp_path / "run"
    assert main(SMALL + ["--epochs", "1", "--output-dir", str(run)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"metrics: {(run / 'metrics.json').resolve()}"
    m = json.loads((run / "metrics.json").read_text())
    for d in ("t2v", "v2t"):
        for key in ("R1", "R5", "R10", "R50", "MdR", "MnR", "Rsum", "num_queries", "num_gallery", "hubness"):
            assert key in m[d]
        assert m[d]["num_queries"] == m[d]["num_gallery"] == 16
        assert 1 <= m[d]["MnR"] <= 16
    for f in ("config.yaml", "build_info.json", "tokenizer.json", "metrics.jsonl", "nk_histogram.png",
              "loss_curves.png"):
        assert (run / f).exists(), f
    assert list((run / "tb").glob("events.out.tfevents.*"))
    info = json.loads((run / "build_info.json").read_text())
    assert "git_commit" in info and "extension_loaded" in info

    assert E.main(["--checkpoint", str(run), "--corrections", "all", "--bank-size", "32",
                   "--output-dir", str(tmp_path / "ev")]) == 0
    m2 = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m2["t2v"]["R1"] == pytest.approx(m["t2v"]["R1"])          # same checkpoint, same ranks
    assert set(m2["corrections"]) == set(E.CORRECTIONS)
    for name, dirs in m2["corrections"].items():
        assert set(dirs) == {"t2v", "v2t"} and "hubness" in dirs["t2v"]
    assert (tmp_path / "ev" / "nk_histogram.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        E.main(["--checkpoint", str(run), "--corrections", "magic"])


@pytest.mark.slow
def test_torchrun_two_cpu_processes(data_env, tmp_path):
    """The command itself under torchrun (gloo): trains, evaluates with the queries split
    across the two ranks, and writes one run folder."""
    import shutil
    import subprocess
    import sys
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29533", "-m", "nbretr.train", *SMALL,
                        "--epochs", "1", "--output-dir", str(run)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == f"metrics: {(run / 'metrics.json').resolve()}"
    m = json.loads((run / "metrics.json").read_text())
    assert m["t2v"]["num_queries"] == 16 and 1 <= m["t2v"]["MnR"] <= 16
    assert json.loads((run / "build_info.json").read_text())["world_size"] == 2
    assert len(_losses(run)) == 3


def test_training_curves_keep_the_last_record_of_a_step(tmp_path):
    """loss_curves.png: one panel per logged quantity; a step logged twice (a resumed run
    repeats the steps after its checkpoint) is drawn once, from its last record."""
    import matplotlib.image as mpimg

    from nbretr.train import save_training_curves, training_curves
    recs = [{"step": s, "epoch": (s - 1) // 4, "lr": 1e-3, "loss": 5.0 - 0.1 * s, "time": s} for s in range(1, 11)]
    recs += [{"step": s, "epoch": (s - 1) // 4, "lr": 2e-3, "loss": 1.0, "time": s} for s in range(6, 11)]
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in recs))
    steps, values, epoch_starts = training_curves(jsonl)
    assert steps == list(range(1, 11)) and list(values) == ["lr", "loss"]
    assert values["loss"][:5] == pytest.approx([4.9, 4.8, 4.7, 4.6, 4.5]) and values["loss"][5:] == [1.0] * 5
    assert values["lr"] == [1e-3] * 5 + [2e-3] * 5
    assert epoch_starts == [5, 9]
    assert save_training_curves(jsonl, tmp_path / "c.png") == ["lr", "loss"]
    img = mpimg.imread(tmp_path / "c.png")
    assert img.shape[0] > 100 and img.shape[1] > 300
    # a record cut short is skipped; a quantity logged from step 6 on is NaN before it, and
    # its moving mean is the mean of the logged values only
    from nbretr.train import moving_mean
    with jsonl.open("a") as f:
        f.write('{"step": 11, "epoch": 2, "lr": 0.002, "loss": 1.0, "kl": 5.0, "time": 11}\n{"step": 12, "ep')
    steps, values, _ = training_curves(jsonl)
    assert steps == list(range(1, 12)) and list(values) == ["lr", "loss", "kl"]
    assert all(v != v for v in values["kl"][:10]) and values["kl"][10] == 5.0
    assert moving_mean(values["kl"], 5)[-3:].tolist() == [5.0, 5.0, 5.0]
    assert moving_mean([1.0, 2.0, float("nan"), 4.0], 3).tolist() == [1.5, 1.5, 3.0, 4.0]
    assert save_training_curves(jsonl, tmp_path / "c2.png") == ["lr", "loss", "kl"]
    (tmp_path / "empty.jsonl").write_text("")
    assert save_training_curves(tmp_path / "empty.jsonl", tmp_path / "none.png") == []
    assert not (tmp_path / "none.png").exists()
