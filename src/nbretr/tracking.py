"""Experiment tracking for ``python -m nbretr.train``: ``--report-to tensorboard,wandb``.

- ``tensorboard`` (the default): event files in ``<run>/tb``. Not installed: one warning,
  the run goes on (``metrics.jsonl`` has the same numbers).
- ``wandb``: a Weights & Biases run in ``<run>/wandb`` with the resolved options as its
  config, every logged training step (``train/loss``, ``train/wti``, ..., ``train/lr``),
  each evaluation during training (``eval/t2v_R1``, ...) and the final test metrics
  (``test/t2v_R1``, ..., also in the run's summary). Without ``WANDB_API_KEY`` (and with no
  ``WANDB_MODE`` and no ``--wandb-mode``) it runs offline, so nothing is sent and nothing
  waits on the network; ``wandb sync <run>/wandb/offline-run-*`` uploads it later. The run
  id is kept in ``<run>/wandb_id.txt``, so ``--resume`` continues the same wandb run. Asked
  for but not installed: an error before training starts (``pip install wandb``).

Only the main process (rank 0) reports.
"""
from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger("nbretr")

WANDB_ID_FILE = "wandb_id.txt"
METRIC_KEYS = ("R1", "R5", "R10", "R50", "MdR", "MnR", "Rsum")


def wandb_mode(option: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The wandb mode a run uses: ``--wandb-mode`` when given, else ``$WANDB_MODE``, else
    "online" with a ``WANDB_API_KEY`` and "offline" without one."""
    env = os.environ if environ is None else environ
    if option:
        return option
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    return "online" if env.get("WANDB_API_KEY") else "offline"


def require_wandb():
    try:
        import wandb
    except ImportError:
        raise ValueError("--report-to wandb: the wandb package is not installed (pip install wandb); "
                         "or leave wandb out of --report-to") from None
    return wandb


def flat_metrics(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """``{"t2v": {"R1": ..}, "v2t": {..}}`` -> ``{"<prefix>/t2v_R1": .., ...}`` (numbers only)."""
    out: dict[str, float] = {}
    for direction in ("t2v", "v2t"):
        part = metrics.get(direction) or {}
        for k in METRIC_KEYS:
            v = part.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{prefix}/{direction}_{k}"] = float(v)
    return out


class Trackers:
    """The run's reporting targets (``--report-to``), on the main process only."""

    def __init__(self, targets: list[str], run_dir: Path, config: Mapping[str, Any], *, is_main: bool = True,
                 project: str = "nbretr", mode: str | None = None, resuming: bool = False):
        self.tb = None
        self.wandb_run = None
        self._pending: tuple[int, dict[str, float]] | None = None  # wandb: this step's values so far
        self.run_dir = Path(run_dir)
        if not is_main:
            return
        if "wandb" in targets:
            wandb = require_wandb()
            chosen = wandb_mode(mode)
            if chosen == "offline" and not mode and not os.environ.get("WANDB_MODE"):
                log.info("wandb: no WANDB_API_KEY, so the run is logged offline in %s/wandb "
                         "(wandb sync uploads it; --wandb-mode online to log online)", self.run_dir)
            id_file = self.run_dir / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if id_file.is_file() else None
            if run_id is None:
                run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], as wandb ids
                id_file.write_text(run_id + "\n")
            self.wandb_run = wandb.init(project=project, dir=str(self.run_dir), id=run_id, name=self.run_dir.name,
                                        config=dict(config), mode=chosen, resume="allow" if resuming else None,
                                        settings=wandb.Settings(console="off", silent=True))
        if "tensorboard" in targets:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:
                log.warning("tensorboard is not installed: no event files (pip install tensorboard)")

    def log(self, values: Mapping[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb_run is not None:
            # one wandb history row per step, committed explicitly (a row that wandb still
            # holds open when the run finishes can be lost): values of the same step are merged
            if self._pending is not None and self._pending[0] != step:
                self._commit()
            if self._pending is None:
                self._pending = (step, {})
            self._pending[1].update(values)

    def _commit(self) -> None:
        if self._pending is not None and self.wandb_run is not None:
            step, values = self._pending
            self.wandb_run.log(values, step=step, commit=True)
        self._pending = None

    def summary(self, values: Mapping[str, float], step: int) -> None:
        """Final numbers: logged at ``step`` and kept in wandb's run summary."""
        self.log(values, step)
        if self.wandb_run is not None:
            self._commit()
            self.wandb_run.summary.update(dict(values))

    def flush(self) -> None:
        """Write TensorBoard's events; the open wandb row stays open (the final test
        metrics join the last training step's row), and is committed by :meth:`close`."""
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self._commit()
            self.wandb_run.finish()
            self.wandb_run = None
