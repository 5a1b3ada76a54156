"""The pretrained stand-in (nbretr.pretrain): built once, cached with a manifest, rebuilt
(never loaded) when the cache is corrupt, partial or for other settings, and read by the
CLIP loader and the embedded default run."""
from __future__ import annotations

import json

import pytest
import torch

from nbretr import pretrain
from nbretr.data import synthetic
from nbretr.models.clip import load_clip


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre") / pretrain.dir_name("small")
    return pretrain.ensure("small", root=root, progress=False)


def _mtimes(root):
    return {p.name: p.stat().st_mtime_ns for p in root.iterdir()}


def test_build_writes_a_checked_hf_folder(stand_in):
    assert pretrain.problems(stand_in, "small") == []
    m = json.loads((stand_in / "manifest.json").read_text())
    assert m["complete"] is True and m["params"] == pretrain.params("small", 0)
    assert set(m["files"]) == set(pretrain.FILES)
    st = m["stats"]
    assert st["last_loss"] < st["first_loss"]            # pretraining learned something
    assert st["val_items"] == pretrain.SETTINGS["small"]["val"] and 0 <= st["val_t2v_R1"] <= 100
    clip = load_clip(stand_in)                             # what --clip tiny-pretrained loads
    assert clip.config.vision_config.patch_size == pretrain.ARCH["patch_size"]
    assert clip.config.text_config.vocab_size == synthetic.word_tokenizer().vocab_size
    assert pretrain.load_tokenizer(stand_in).itos == synthetic.word_tokenizer().itos
    assert not any(p.name.endswith(".tmp") for p in stand_in.parent.iterdir())


def test_a_sound_cache_is_reused(stand_in, monkeypatch):
    before = _mtimes(stand_in)

    def boom(*a, **k):
        raise AssertionError("pretrained again")
    monkeypatch.setattr(pretrain, "pretrain", boom)
    assert pretrain.ensure("small", root=stand_in) == stand_in
    assert _mtimes(stand_in) == before


def _damaged(stand_in, root, damage):
    import shutil
    shutil.copytree(stand_in, root)
    weights = root / "model.safetensors"
    m = json.loads((root / "manifest.json").read_text())
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "delete":
        weights.unlink()
    elif damage == "manifest":
        (root / "manifest.json").unlink()
    elif damage == "incomplete":
        m["complete"] = False
        (root / "manifest.json").write_text(json.dumps(m))
    else:
        m["params"]["epochs"] += 1
        (root / "manifest.json").write_text(json.dumps(m))
    return root


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest", "incomplete", "settings"])
def test_damage_is_found(stand_in, tmp_path, damage):
    root = _damaged(stand_in, tmp_path / "copy", damage)
    assert pretrain.problems(root, "small")


def test_a_damaged_cache_is_rebuilt_not_loaded(stand_in, tmp_path, monkeypatch):
    root = _damaged(stand_in, tmp_path / "copy", "flip")
    calls = []
    real = pretrain.pretrain

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(pretrain, "pretrain", counted)
    assert pretrain.ensure("small", root=root, progress=False) == root
    assert calls == [1] and pretrain.problems(root, "small") == []
    # the rebuilt folder loads and equals a fresh build (same seed, same threads)
    a = load_clip(root).state_dict()
    b = load_clip(stand_in).state_dict()
    assert a.keys() == b.keys()


def test_unknown_size_is_named():
    with pytest.raises(ValueError, match="size must be one of"):
        pretrain.params("huge", 0)


def test_train_fine_tunes_the_stand_in_beside_the_data_root(tmp_path, monkeypatch):
    """The embedded default starts from the stand-in (built beside --data-root on first
    use), and its CLIP weights are the stand-in's at step 0."""
    from nbretr import builders
    from nbretr.config import build_parser, resolve_config
    data = synthetic.build(tmp_path / "syn", "small", progress=False)
    cfg = resolve_config(build_parser("t").parse_args(["--synthetic-size", "small", "--data-root", str(data)]))
    assert cfg.clip == "tiny-pretrained" and (cfg.lr, cfg.coef_lr, cfg.w_opt, cfg.detach_centrality) == (
        1e-4, 1e-3, 1.0, False)                          # the reference's values
    model = builders.build_model(cfg, None)
    root = tmp_path / pretrain.dir_name("small")
    assert pretrain.problems(root, "small") == []
    want = load_clip(root).state_dict()
    got = model.clip.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want if not k.endswith("position_ids"))
    with pytest.raises(ValueError, match="--clip-layers 4 \\(the stand-in has 2\\)"):
        resolve_config(build_parser("t").parse_args(["--clip-layers", "4"]))
    assert resolve_config(build_parser("t").parse_args(["--clip", "tiny", "--clip-layers", "4"])).clip_layers == 4
    with pytest.raises(ValueError, match="tiny-pretrained .* synthetic only"):
        resolve_config(build_parser("t").parse_args(["--dataset", "msrvtt", "--data-root", str(tmp_path),
                                                     "--clip", "tiny-pretrained"]))
