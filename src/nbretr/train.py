"""``python -m nbretr.train``: train NeighborRetr (or the InfoNCE baseline) and evaluate.

With no arguments: the pretrained tiny CLIP stand-in (pretrained and cached on first use,
``nbretr.pretrain``) fine-tuned on the embedded synthetic dataset (generated on first
use), on whatever device is here; finishes on 2 CPU cores in minutes and prints
R@K, MdR, MnR, Rsum and the hubness table, then the path of metrics.json (last line).
With arguments: the reference recipe (``--dataset msrvtt --data-root ... --clip ViT-B/32
--clip-path ...``), a YAML ``--config`` that the command line overrides, ``--baseline``.
Several GPUs or machines: ``torchrun --nproc_per_node N -m nbretr.train ...``.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import nbretr
from nbretr import checkpoint as ckpt
from nbretr import eval as evaluation
from nbretr.config import TrainConfig, build_parser, dataset_key, resolve_config, save_yaml, to_yaml
from nbretr.builders import (build_datasets, build_model, build_split, build_tokenizer, drop_bad, make_loader,
                             prepare_clip, to_device)
from nbretr.memory_bank import MemoryBank
from nbretr.optim import build_optimizer
from nbretr.runtime import (Dist, FolderLock, Interrupted, ResumableSampler, amp_dtype, cleanup_distributed, git_commit,
                            holds_run, new_run_dir, setup_distributed, setup_logging, write_json)

log = logging.getLogger("nbretr")

# Datasets whose validation split is not their test split (--eval-protocol held-out).
HAS_VALIDATION_SPLIT = {"msvd", "didemo", "coco", "flickr30k", "synthetic"}

# What a training checkpoint must hold to be resumed.
TRAINING_STATE_KEYS = ("model", "optimizer", "scheduler", "scaler", "bank", "rng", "epoch", "step_in_epoch",
                       "global_step", "config")

# -- training --------------------------------------------------------------------------------

class Trainer:
    def __init__(self, cfg: TrainConfig, dist_: Dist, run_dir: Path):
        self.cfg, self.dist, self.run_dir = cfg, dist_, run_dir
        self.device = dist_.device
        torch.manual_seed(cfg.seed)
        self.tokenizer = build_tokenizer(cfg, run_dir if dist_.is_main else None)
        datasets = build_datasets(cfg, self.tokenizer, ("train", "test") if cfg.do_eval else ("train",),
                                  out_dir=run_dir if dist_.is_main else None)
        self.train_ds, self.test_ds = datasets["train"], datasets.get("test")
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, getattr(self.tokenizer, "vocab_size", None)).to(self.device)
        prepare_clip(self.model, cfg, self.device)
        self.ddp = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                       find_unused_parameters=True) if dist_.enabled else self.model
        self.sampler = ResumableSampler(len(self.train_ds), cfg.batch_size, dist_.rank, dist_.world_size,
                                        shuffle=True, seed=cfg.seed, order=cfg.sampler or "nbretr",
                                        reshuffle=cfg.reshuffle is not False,
                                        replicas=cfg.grad_world_size or dist_.world_size)
        if self.sampler.batches_per_epoch == 0:
            raise ValueError(f"--batch-size {cfg.batch_size} is larger than the training set "
                             f"({len(self.train_ds)} items)")
        self.steps_per_epoch = self.sampler.batches_per_epoch
        total = self.steps_per_epoch * cfg.epochs
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        self.optimizer, self.sched = build_optimizer(self.model, cfg.lr, cfg.coef_lr, cfg.weight_decay,
                                                     self.steps_per_epoch * cfg.epochs, cfg.warmup_proportion,
                                                     cfg.optimizer, decay_exempt=cfg.decay_exempt or "1d")
        self.amp = amp_dtype(cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        dim = self.model.dim
        self.bank = MemoryBank.for_features(max(1, cfg.mb_batch * cfg.batch_size), cfg.max_words, cfg.max_frames,
                                            dim, device=self.device) if cfg.mb_batch > 0 and not cfg.baseline else None
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.last_checkpoint: tuple[Path, int] | None = None
        self._stop_requested = False
        self._setup_evaluation()
        from nbretr.config import report_targets
        from nbretr.tracking import Trackers
        self.trackers = Trackers(report_targets(cfg.report_to), run_dir, cfg.to_dict(), is_main=dist_.is_main,
                                 project=cfg.wandb_project, mode=cfg.wandb_mode, resuming=bool(cfg.resume))

    # checkpoints ---------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
            "bank": self.bank.state_dict() if self.bank is not None else None,
            "rng": ckpt.rng_state(), "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step, "config": self.cfg.to_dict(), "eval_best": self.best,
            "nbretr_version": nbretr.__version__,
        }

    def save(self) -> Path | None:
        if not self.dist.is_main:
            return None
        path = ckpt.save_rotating(self.state(), self.run_dir / "checkpoints" / "last.pt")
        self.last_checkpoint = (path, self.global_step)
        log.info("checkpoint: %s (epoch %d, step %d)", path, self.epoch, self.global_step)
        return path

    def load(self, state: dict[str, Any], path: Path) -> None:
        """Continue from a checkpoint ``state`` (read from ``path``)."""
        ckpt.clean_partials(path.parent)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.bank is not None and state["bank"] is not None:
            self.bank.load_state_dict(state["bank"])
        ckpt.set_rng_state(state["rng"])
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.best = state.get("eval_best") or {}
        self.last_checkpoint = (path, self.global_step)
        log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.global_step)

    # evaluation during training ----------------------------------------------------
    def _setup_evaluation(self) -> None:
        """``--eval-every N``: evaluate every N steps and at each epoch's end. Protocol
        "held-out": on the validation split, keeping ``checkpoints/best.pt`` by the summed
        validation Rsum of both directions (datasets without a validation split are
        evaluated once, on the test split, at the end). Protocol "best-of-test" (the released
        code's): on the test split, also at step 1, keeping the best text->video and the best
        video->text R@1 separately; reported as such, beside the final weights' test result."""
        cfg = self.cfg
        self.eval_every = int(cfg.eval_every or 0) if cfg.do_eval else 0
        self.protocol = cfg.eval_protocol or "held-out"
        self.best: dict[str, Any] = {}
        self.eval_ds = None
        if not self.eval_every:
            return
        if self.protocol == "best-of-test":
            self.eval_ds = self.test_ds
        elif dataset_key(cfg.dataset) in HAS_VALIDATION_SPLIT:
            self.eval_ds = build_split(cfg, "val", self.tokenizer)
        else:
            log.warning("--eval-every %d: %s has no validation split apart from its test split, so no "
                        "checkpoint is chosen during training; the test split is evaluated once at the end "
                        "(--eval-protocol best-of-test evaluates the test split during training, as the "
                        "released code does)", self.eval_every, cfg.dataset)
            self.eval_every = 0

    def maybe_evaluate(self, epoch_end: bool = False) -> None:
        due = self.eval_every and (epoch_end or self.global_step % self.eval_every == 0
                                   or (self.protocol == "best-of-test" and self.global_step == 1))
        if not due or self.eval_ds is None or self.global_step == getattr(self, "_last_eval_step", None):
            return
        self._last_eval_step = self.global_step
        m = evaluation.evaluate(self.model, self.eval_ds, self.cfg, self.dist, k=self.cfg.eval_k)
        keys = ("R1", "R5", "R10", "R50", "MdR", "MnR", "Rsum", "num_queries", "num_gallery")
        rec = {"step": self.global_step, "epoch": self.epoch, "split": self.eval_ds.split,
               **{d: {k: m[d][k] for k in keys} for d in ("t2v", "v2t")}}
        if self.protocol == "best-of-test":
            for d in ("t2v", "v2t"):
                if d not in self.best or m[d]["R1"] > self.best[d]["R1"]:
                    self.best[d] = {**rec[d], "step": self.global_step}
            self.best["evaluations"] = int(self.best.get("evaluations", 0)) + 1
        else:
            score = m["t2v"]["Rsum"] + m["v2t"]["Rsum"]
            if score > self.best.get("score", -math.inf):
                self.best = {"score": score, "step": self.global_step}
                if self.dist.is_main:
                    ckpt.save_atomic({"model": self.model.state_dict(), "global_step": self.global_step,
                                      "config": self.cfg.to_dict(), "val_rsum": score},
                                     self.run_dir / "checkpoints" / "best.pt")
        if self.dist.is_main:
            from nbretr.tracking import flat_metrics
            self.trackers.log(flat_metrics(m, "eval"), self.global_step)
            with open(self.run_dir / "eval_history.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            log.info("step %d, %s split: t2v R@1 %.1f Rsum %.1f, v2t R@1 %.1f Rsum %.1f", self.global_step,
                     self.eval_ds.split, m["t2v"]["R1"], m["t2v"]["Rsum"], m["v2t"]["R1"], m["v2t"]["Rsum"])

    def final_evaluation(self) -> dict[str, Any] | None:
        """The test split's report under the run's protocol (see :meth:`_setup_evaluation`)."""
        if self.test_ds is None:
            return None
        label = "test split, final weights"
        selected = None
        best_path = self.run_dir / "checkpoints" / "best.pt"
        if self.protocol == "held-out" and self.best.get("step") is not None and best_path.is_file():
            state = ckpt.load(best_path, map_location=self.device, required=("model",))
            self.model.load_state_dict(state["model"])
            selected = {"by": "validation Rsum (t2v + v2t)", "step": int(self.best["step"]),
                        "val_rsum": float(self.best["score"])}
            label = f"test split, checkpoint chosen on the validation Rsum (step {selected['step']})"
        metrics = evaluation.evaluate(self.model, self.test_ds, self.cfg, self.dist, k=self.cfg.eval_k,
                                      out_dir=self.run_dir)
        metrics.update(protocol=self.protocol, label=label)
        if selected:
            metrics["selected_checkpoint"] = selected
        if self.protocol == "best-of-test" and "t2v" in self.best:
            metrics["best_of_test"] = {
                "label": (f"best-of-test (the released code's protocol, not a held-out result): the best test "
                          f"R@1 of {self.best['evaluations']} evaluations during training, text->video and "
                          "video->text chosen separately, possibly from different steps"),
                "t2v": self.best["t2v"], "v2t": self.best["v2t"], "evaluations": self.best["evaluations"]}
        return metrics

    # memory bank -----------------------------------------------------------------
    @torch.no_grad()
    def refill_bank(self, loader_iter_factory) -> None:
        """docs/method.md: at each epoch start, encode ``mb_batch`` training batches without
        gradient (every rank's share, all-gathered) and refill the bank with them."""
        if self.bank is None:
            return
        self.model.eval()
        batches = []
        it = loader_iter_factory()
        for _ in range(self.cfg.mb_batch):
            try:
                batch = to_device(drop_bad(next(it)), self.device)
            except StopIteration:
                break
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                batches.append(self.model.encode_for_bank(batch))
        self.bank.fill(batches)
        self.model.train()

    # loop -------------------------------------------------------------------------
    def train(self) -> None:
        from tqdm import tqdm
        cfg = self.cfg
        per_rank = cfg.batch_size // self.dist.world_size
        jsonl = open(self.run_dir / "metrics.jsonl", "a") if self.dist.is_main else None
        t_start = time.time()
        self._start_step = self.global_step
        pbar = tqdm(total=self.total_steps, initial=self.global_step, disable=not self.dist.is_main,
                    desc="train", unit="step", dynamic_ncols=True)
        self.model.train()
        restore_sigint = self._catch_sigint()
        try:
            while self.epoch < cfg.epochs and self.global_step < self.total_steps:
                if self.step_in_epoch == 0:
                    def fresh_iter():
                        self.sampler.set_epoch(self.epoch, 0)
                        return iter(make_loader(self.train_ds, self.sampler, per_rank, cfg.num_workers))
                    self.refill_bank(fresh_iter)
                self.sampler.set_epoch(self.epoch, self.step_in_epoch)
                loader = make_loader(self.train_ds, self.sampler, per_rank, cfg.num_workers)
                for batch in loader:
                    if self.global_step >= self.total_steps:
                        break
                    parts = self.train_step(to_device(drop_bad(batch), self.device))
                    self.step_in_epoch += 1
                    self.global_step += 1
                    self.log_step(parts, pbar, jsonl, per_rank * self.dist.world_size, t_start)
                    if cfg.save_every and self.global_step % cfg.save_every == 0:
                        self.save()
                    self.maybe_evaluate()
                    if self._should_stop():
                        self.save()
                        raise Interrupted(self.interrupt_message())
                self.report_bad_data()
                if self.step_in_epoch >= self.steps_per_epoch:
                    self.maybe_evaluate(epoch_end=True)
                    self.epoch += 1
                    self.step_in_epoch = 0
                self.save()
        finally:
            restore_sigint()
            pbar.close()
            if jsonl:
                jsonl.close()
            self.trackers.flush()

    # Ctrl-C ----------------------------------------------------------------------------
    def _catch_sigint(self):
        """First Ctrl-C: finish the step, save a checkpoint and stop (:class:`Interrupted`);
        a second one stops at once. Returns the function that restores the old handler."""
        import signal
        import threading
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            log.warning("interrupted: finishing this step and saving a checkpoint (Ctrl-C again to stop at once)")

        signal.signal(signal.SIGINT, handler)
        return lambda: signal.signal(signal.SIGINT, previous)

    def _should_stop(self) -> bool:
        if not self.dist.enabled:
            return self._stop_requested
        flag = torch.tensor([1 if self._stop_requested else 0], device=self.device)
        torch.distributed.all_reduce(flag)  # every rank stops after the same step
        return bool(flag.item())

    def interrupt_message(self) -> str:
        return interrupt_message(self.run_dir, self.last_checkpoint, self.global_step)

    def train_step(self, batch: dict) -> dict[str, float]:
        cfg = self.cfg
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            out = self.ddp(batch, bank=self.bank)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.global_step}: {out}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.sched.step()
        self.model.clamp_logit_scale()
        if self.bank is not None:  # after backward: the loss read the bank's buffers in place
            self.bank.push(out["bank_items"])
        # the logged loss parts (docs/method.md): "opt" is L_opt, not the optimizer
        return {k: float(v.detach()) for k, v in out.items() if k in ("loss", "wti", "nbi", "opt", "kl", "infonce")}

    def log_step(self, parts, pbar, jsonl, items_per_step, t_start) -> None:
        elapsed = time.time() - t_start
        rate = items_per_step * (self.global_step - self._start_step) / max(elapsed, 1e-9)
        pbar.set_postfix({**{k: f"{v:.3f}" for k, v in parts.items()}, "items/s": f"{rate:.0f}"}, refresh=False)
        pbar.update(1)
        if jsonl is not None:
            rec = {"step": self.global_step, "epoch": self.epoch, "lr": self.sched.get_last_lr()[0], **parts,
                   "time": round(elapsed, 3)}
            jsonl.write(json.dumps(rec) + "\n")
            jsonl.flush()
        if self.global_step % self.cfg.log_every == 0 or self.global_step == 1:
            self.trackers.log({**{f"train/{k}": v for k, v in parts.items()}, "train/lr": self.sched.get_last_lr()[0]},
                              self.global_step)

    def report_bad_data(self) -> None:
        from nbretr.data import log_bad_summary
        log_bad_summary(self.train_ds, epoch=self.epoch, reset=True)


def interrupt_message(run_dir: Path | None, last: tuple[Path, int] | None, step: int | None = None) -> str:
    where = f" at step {step}" if step is not None else ""
    if last is None:
        return f"interrupted{where} before the first checkpoint; nothing to resume" + (
            f" (run folder {run_dir})" if run_dir else "")
    path, at = last
    return (f"interrupted{where}; last checkpoint {path} (step {at}). Continue with: "
            f"python -m nbretr.train --resume {run_dir}")


class RunFolder:
    """The run's output folder: made (or, with --resume, reopened) and locked by the main
    process. A folder that already holds another run is refused unless resumed; a run that
    fails before training starts leaves nothing behind (the folder itself when it made it,
    else the files it wrote)."""

    WRITES = ("config.yaml", "build_info.json", "tokenizer.json", "tb", "wandb", "wandb_id.txt")

    def __init__(self, path: Path, *, resuming: bool, is_main: bool):
        self.path, self.is_main = path, is_main
        self.created = not path.exists()
        self.lock = None
        if not is_main:
            return
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"--output-dir {path} is a file, not a folder")
        path.mkdir(parents=True, exist_ok=True)
        self.lock = FolderLock(path)
        found = holds_run(path)
        if found and not resuming:
            self.lock.release(remove=self.created)
            raise ValueError(f"--output-dir {path} already holds a run ({', '.join(found)}); continue it "
                             f"with --resume {path}, or choose another folder")

    def discard(self) -> None:
        """Remove what this run wrote (it failed before training started)."""
        if not self.is_main or not self.path.is_dir():
            return
        import shutil
        if self.lock is not None:
            self.lock.release(remove=True)
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for name in self.WRITES:
            p = self.path / name
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def training_curves(jsonl_path: str | Path) -> tuple[list[int], dict[str, list[float]], list[int]]:
    """A run's metrics.jsonl as ``(steps, {name: values}, epoch_starts)``: every logged
    number but step, epoch and time (loss parts, learning rate). A step logged twice (a
    resumed run repeats the steps after its checkpoint) keeps its last record; a line that
    does not parse (a write cut short) is skipped. A quantity missing from a record is NaN
    there."""
    records: dict[int, dict] = {}
    for line in Path(jsonl_path).read_text().splitlines():
        try:
            rec = json.loads(line)
            records[int(rec["step"])] = rec
        except (ValueError, KeyError, TypeError):
            continue
    steps = sorted(records)
    if not steps:
        return [], {}, []
    names: dict[str, None] = {}  # every logged number, in order of first appearance
    for s in steps:
        names.update((k, None) for k, v in records[s].items()
                     if k not in ("step", "epoch", "time") and isinstance(v, (int, float)))
    values = {n: [float(records[s].get(n, math.nan)) for s in steps] for n in names}
    epoch_starts = [s for prev, s in zip(steps, steps[1:]) if records[s]["epoch"] != records[prev]["epoch"]]
    return steps, values, epoch_starts


def moving_mean(y, w: int):
    """Centred moving mean over windows of ``w`` values, of the finite values in each
    window (NaN where a window has none): missing steps neither pull it to 0 nor end it."""
    import numpy as np
    y = np.asarray(y, dtype=float)
    kernel = np.ones(max(1, min(w, len(y))))
    valid = np.convolve(np.isfinite(y).astype(float), kernel, mode="same")
    total = np.convolve(np.where(np.isfinite(y), y, 0.0), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid > 0, total / valid, np.nan)


def save_training_curves(jsonl_path: str | Path, png_path: str | Path, smooth: int = 20) -> list[str]:
    """Plot :func:`training_curves` one panel per quantity: the raw values faint, a centred
    moving average of ``smooth`` steps on top (the learning rate as it is), epoch starts
    dotted. Returns the plotted names; no file when nothing was logged."""
    import numpy as np

    from nbretr._plot import pyplot, save_figure
    plt = pyplot()

    steps, values, epoch_starts = training_curves(jsonl_path)
    if not steps:
        return []
    names = list(values)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    x = np.array(steps)
    for ax, name in zip(axes.flat, names):
        y = np.array(values[name])
        if name == "lr":  # a schedule, not a noisy measurement: drawn as it is
            ax.plot(x, y, color="#1f3b5c", linewidth=1.6)
        else:
            ax.plot(x, y, color="#3b6ea5", alpha=0.35, linewidth=0.8)
        w = min(smooth, len(y))
        if w > 1 and name != "lr":
            ax.plot(x, moving_mean(y, w), color="#1f3b5c", linewidth=1.6)
        for e in epoch_starts:
            ax.axvline(e, color="#999999", linestyle=":", linewidth=0.8)
        if name == "lr" or (np.nanmin(y) > 0 and np.nanmax(y) / max(np.nanmin(y), 1e-30) > 100):
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    save_figure(fig, png_path)
    return names


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint file, or a run folder's ``checkpoints/last.pt``."""
    p = Path(path)
    return p / "checkpoints" / "last.pt" if p.is_dir() else p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    resumed, resume_file = None, None
    if args.resume:
        resume_file = checkpoint_file(args.resume)
        if not resume_file.is_file() and not resume_file.with_name(ckpt.PREVIOUS_NAME).is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {resume_file}")
        resumed, resume_file = ckpt.load_with_fallback(resume_file, required=TRAINING_STATE_KEYS)
    cfg = resolve_config(args, resumed["config"] if resumed else None, str(args.resume or ""))
    if cfg.init_model and resumed is None:  # fine-tuning an exported model (python -m nbretr.export)
        from nbretr.builders import init_model_config
        cfg = init_model_config(cfg, {k: v for k, v in vars(args).items() if v is not None})
    if cfg.print_config:
        print(to_yaml(cfg), end="")
        return 0
    if resume_file is not None:
        cfg.resume = str(args.resume)
        own = resume_file.parent.parent
        if args.output_dir and Path(args.output_dir).resolve() != own.resolve():
            raise ValueError(f"--output-dir {args.output_dir}: a resumed run writes into its own folder {own}")
        cfg.output_dir = str(own)
    dist_ = setup_distributed(cfg.device)
    setup_logging(dist_.rank)
    run: RunFolder | None = None
    trainer: Trainer | None = None
    try:
        with nbretr.ops.use_backend(cfg.backend):
            run_dir = Path(cfg.output_dir) if cfg.output_dir else new_run_dir(None, create=False)
            if dist_.enabled:
                obj = [str(run_dir)]
                torch.distributed.broadcast_object_list(obj, src=0)
                run_dir = Path(obj[0])
            run = RunFolder(run_dir, resuming=resume_file is not None, is_main=dist_.is_main)
            if dist_.is_main and resume_file is None:
                save_yaml(cfg, run_dir / "config.yaml")
            if dist_.is_main:
                write_json(run_dir / "build_info.json", {**nbretr.build_info(), "git_commit": git_commit(),
                                                         "world_size": dist_.world_size,
                                                         "device": str(dist_.device)})
            try:
                trainer = Trainer(cfg, dist_, run_dir)
                if resumed is not None:
                    trainer.load(resumed, resume_file)
                    resumed = None  # the tensors now live in the model and optimiser
            except Exception:
                if resume_file is None:
                    run.discard()
                raise
            log.info("run folder %s; %d steps (%d per epoch), global batch %d on %d process(es), device %s, "
                     "backend %s; recipe %s, preset %s (--print-config shows every option)", run_dir,
                     trainer.total_steps, trainer.steps_per_epoch, cfg.batch_size, dist_.world_size, dist_.device,
                     cfg.backend, cfg.recipe, cfg.preset)
            trainer.train()
            if dist_.is_main:
                curves = run_dir / "loss_curves.png"
                try:  # a plot must not cost the run its evaluation
                    if save_training_curves(run_dir / "metrics.jsonl", curves):
                        log.info("training curves: %s", curves)
                except Exception as exc:  # noqa: BLE001
                    log.warning("could not plot the training curves (%s: %s)", type(exc).__name__, exc)
            metrics_path = None
            if cfg.do_eval and trainer.test_ds is not None:
                metrics = trainer.final_evaluation()
                if dist_.is_main:
                    from nbretr.tracking import flat_metrics
                    trainer.trackers.summary(flat_metrics(metrics, "test"), trainer.global_step)
                    print(evaluation.format_report(metrics))
                    metrics_path = write_json(run_dir / "metrics.json", metrics)
            if dist_.is_main:
                print(f"metrics: {metrics_path.resolve()}" if metrics_path else f"run folder: {run_dir.resolve()}")
            return 0
    except KeyboardInterrupt:
        if trainer is not None:
            raise Interrupted(trainer.interrupt_message()) from None
        raise Interrupted(interrupt_message(run.path if run else None, None)) from None
    finally:
        if trainer is not None:
            trainer.trackers.close()
        if run is not None:
            run.release()
        cleanup_distributed()


if __name__ == "__main__":
    from nbretr.runtime import run_cli
    sys.exit(run_cli(main, "python -m nbretr.train"))
