"""``python -m nbretr.export``: write a trained model as a portable model folder
(weights-only safetensors, config.json, tokenizer; see :mod:`nbretr.pretrained`).

    python -m nbretr.export runs/<run> models/mine               # an nbretr training run
    python -m nbretr.export --from-released pytorch_model.bin models/released \\
        --tokenizer /ckpt/bpe_simple_vocab_16e6.txt.gz           # the released NeighborRetr code's weights

The folder is read by ``NeighborRetr.from_pretrained(folder)``, ``python -m nbretr.index``,
``python -m nbretr.eval --init-model folder`` and ``python -m nbretr.train --init-model folder``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def export_run(run: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Export a training run (its folder or a checkpoint file) to a model folder."""
    from nbretr import checkpoint as ckpt
    from nbretr import pretrained
    from nbretr.builders import build_model as build_run_model, build_tokenizer, image_size
    from nbretr.config import TrainConfig, known_fields
    p = Path(run)
    f = p / "checkpoints" / "last.pt" if p.is_dir() else p
    if p.is_dir() and not f.exists() and not f.with_name(ckpt.PREVIOUS_NAME).exists():
        raise FileNotFoundError(f"export: {p} holds no checkpoints/last.pt: not a training run folder")
    state, f = ckpt.load_with_fallback(f, required=("model", "config"))
    cfg = TrainConfig(**known_fields(state["config"], f"checkpoint {f}"))
    run_dir = f.parent.parent
    tok = build_tokenizer(cfg, run_dir)
    model = build_run_model(cfg, getattr(tok, "vocab_size", None))
    model.load_state_dict(state["model"])
    data = {"max_words": cfg.max_words, "max_frames": cfg.max_frames, "video_framerate": cfg.video_framerate,
            "frame_sampling": cfg.frame_sampling or "uniform", "image_size": image_size(cfg)}
    tc = {k: v for k, v in state["config"].items()
          if k not in ("output_dir", "resume", "init_model", "print_config", "max_steps")}
    return pretrained.save_pretrained(model, tok, out_dir, data=data, train_config=tc, source=f"nbretr run checkpoint {f}")


def main(argv: list[str] | None = None) -> int:
    from nbretr import pretrained
    from nbretr.runtime import setup_logging
    p = argparse.ArgumentParser(prog="python -m nbretr.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a training run folder (or one of its checkpoint files); with --from-released, "
                                  "the released code's pytorch_model.bin")
    p.add_argument("out_dir", help="the new model folder (must not exist, or be empty)")
    p.add_argument("--from-released", action="store_true",
                   help="SOURCE is a checkpoint of the released NeighborRetr code (its model.state_dict())")
    g = p.add_argument_group("--from-released only (the released checkpoint carries neither tokenizer nor data "
                             "settings)")
    g.add_argument("--tokenizer", default=None,
                   help="CLIP's tokenizer: a Hugging Face CLIP folder or bpe_simple_vocab_16e6.txt.gz")
    g.add_argument("--max-words", type=int, default=24, help="caption tokens (default 24, MSR-VTT's)")
    g.add_argument("--max-frames", type=int, default=12, help="frames per video (default 12)")
    g.add_argument("--video-framerate", type=float, default=1.0, help="frames per second sampled (default 1)")
    g.add_argument("--frame-sampling", default="first", choices=("first", "uniform"),
                   help="first (the released code's first max-frames seconds, default) or uniform")
    g.add_argument("--dataset", default="msrvtt", help="dataset the weights were trained on (for nbretr.eval)")
    args = p.parse_args(argv)
    setup_logging(0)
    if args.from_released:
        out = pretrained.export_released(args.source, args.out_dir, args.tokenizer, max_words=args.max_words,
                                         max_frames=args.max_frames, video_framerate=args.video_framerate,
                                         frame_sampling=args.frame_sampling, dataset=args.dataset)
    else:
        if args.tokenizer is not None:
            p.error("--tokenizer is for --from-released; a run's own tokenizer is exported with it")
        out = export_run(args.source, args.out_dir)
    cfg = pretrained.read_config(out)
    print(f"model folder: {out.resolve()} (fingerprint {cfg['fingerprint'][:16]}, {cfg['source']})")
    return 0


if __name__ == "__main__":
    from nbretr.runtime import run_cli
    sys.exit(run_cli(main, "python -m nbretr.export"))
