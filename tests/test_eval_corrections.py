"""python -m nbretr.eval's correction options: every parameter reaches the corrections, and
the report and metrics.json state the parameters, the banks and the tie rule."""
import json
import os

import pytest

pytestmark = pytest.mark.slow  # the module fixture trains a run

SMALL = ["--synthetic-size", "small", "--batch-size", "12", "--num-workers", "0", "--mb-batch", "1",
         "--num-neighbors", "4", "--temporal-layers", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from nbretr.train import main
    root = tmp_path_factory.mktemp("nbdata")
    old = os.environ.get("NBRETR_DATA")
    os.environ["NBRETR_DATA"] = str(root)
    out = tmp_path_factory.mktemp("run") / "run"
    try:
        assert main(SMALL + ["--epochs", "1", "--do-eval", "false", "--output-dir", str(out)]) == 0
        yield out
    finally:
        if old is None:
            os.environ.pop("NBRETR_DATA", None)
        else:
            os.environ["NBRETR_DATA"] = old


def test_defaults_are_the_authors(run, tmp_path, capsys):
    from nbretr import eval as E
    assert E.main(["--checkpoint", str(run), "--corrections", "all", "--output-dir", str(tmp_path)]) == 0
    report = capsys.readouterr().out
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["hubness_ties"] == "lower-index" and "tie_seed" not in m
    c = m["corrections"]
    assert set(c) == set(E.CORRECTIONS)
    q = c["qbnorm"]["t2v"]["params"]
    assert (q["beta"], q["k"]) == (20.0, 1)
    assert q["query_bank"]["split"] == "train" and q["query_bank"]["items"] == "captions"
    assert q["query_bank"]["requested"] == 5000 and q["query_bank"]["seed"] == 0
    assert c["qbnorm"]["v2t"]["params"]["query_bank"]["items"] == "videos"
    d = c["dbnorm"]["t2v"]["params"]
    assert d["beta1"] == pytest.approx(1 / 1.99) and d["beta2"] == 3.0 and d["dynamic"] is False
    assert d["method"] == "dual inverted softmax"
    assert d["gallery_bank"]["items"] == "videos" and d["gallery_bank"]["requested"] == 5000
    assert c["dbnorm"]["v2t"]["params"]["gallery_bank"]["items"] == "captions"
    assert (c["nnn"]["t2v"]["params"]["k"], c["nnn"]["t2v"]["params"]["alpha"]) == (128, 0.75)
    assert c["csls"]["t2v"]["params"]["k"] == 10
    assert c["dsl"]["t2v"]["params"]["temperature"] == 1000.0
    assert "top-k ties lower-index" in report
    assert "corrections (parameters and banks):" in report
    assert "dbnorm t2v: dual inverted softmax; beta1 0.502513, beta2 3, dynamic no;" in report
    assert "gallery bank: " in report and "train videos, seed 0 (WTI videos x videos)" in report


def test_every_option_is_passed_through(run, tmp_path, capsys):
    from nbretr import eval as E
    args = ["--checkpoint", str(run), "--corrections", "all", "--output-dir", str(tmp_path),
            "--qbnorm-beta", "7", "--qbnorm-k", "3", "--dbnorm-beta1", "2", "--dbnorm-beta2", "4",
            "--dbnorm-dynamic", "--dbnorm-k", "2", "--nnn-k", "5", "--nnn-alpha", "0.5", "--csls-k", "4",
            "--dsl-temperature", "0.01", "--query-bank-size", "12", "--gallery-bank-size", "6",
            "--bank-seed", "9", "--hubness-ties", "random", "--tie-seed", "5"]
    assert E.main(args) == 0
    report = capsys.readouterr().out
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert (m["hubness_ties"], m["tie_seed"]) == ("random", 5)
    c = m["corrections"]
    for d in ("t2v", "v2t"):
        assert {k: c["qbnorm"][d]["params"][k] for k in ("beta", "k")} == {"beta": 7.0, "k": 3}
        p = c["dbnorm"][d]["params"]
        assert (p["beta1"], p["beta2"], p["dynamic"], p["k"]) == (2.0, 4.0, True, 2)
        assert p["method"] == "dual dynamic inverted softmax"
        assert p["query_bank"]["size"] == 12 and p["gallery_bank"]["size"] == 6
        assert p["query_bank"]["seed"] == p["gallery_bank"]["seed"] == 9
        assert (c["nnn"][d]["params"]["k"], c["nnn"][d]["params"]["alpha"]) == (5, 0.5)
        assert c["csls"][d]["params"]["k"] == 4
        assert c["dsl"][d]["params"]["temperature"] == 0.01
    assert "top-k ties random (seed 5)" in report
    assert ("dsl t2v: s * softmax over the test queries of s / T; temperature 0.01, "
            "softmax_over the 16 test captions") in report
    assert "query bank: 12 train captions, seed 9" in report
    # --bank-size sets both banks; a specific option wins
    assert E.main(["--checkpoint", str(run), "--corrections", "dbnorm", "--output-dir", str(tmp_path / "2"),
                   "--bank-size", "8", "--gallery-bank-size", "3"]) == 0
    p = json.loads((tmp_path / "2" / "metrics.json").read_text())["corrections"]["dbnorm"]["t2v"]["params"]
    assert (p["query_bank"]["requested"], p["gallery_bank"]["requested"]) == (8, 3)


@pytest.mark.parametrize("opt,val,msg", [("--qbnorm-k", "0", "--qbnorm-k must be >= 1"),
                                         ("--dsl-temperature", "0", "--dsl-temperature must be > 0"),
                                         ("--hubness-ties", "first", "invalid choice: 'first'")])
def test_bad_options_are_named(run, capsys, opt, val, msg):
    from nbretr import eval as E
    with pytest.raises(SystemExit) as exc:
        E.main(["--checkpoint", str(run), "--corrections", "all", opt, val])
    assert exc.value.code == 2
    assert msg in capsys.readouterr().err
