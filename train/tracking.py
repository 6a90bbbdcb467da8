"""Where a run's metrics go besides ``RUN/metrics.jsonl``: TensorBoard and Weights & Biases.

Both are optional extras (``pip install -e .[track]``) and only rank 0 logs. TensorBoard writes
event files to ``RUN/tb``. W&B logs to the project ``--wandb PROJECT`` with the run's folder name
and its resolved config; the W&B run id is kept in ``RUN/wandb-id.txt`` so a resumed run continues
the same W&B run. Set ``WANDB_MODE=offline`` where there is no network (files stay in
``RUN/wandb`` for a later ``wandb sync``).
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repa_cache.cache.errors import UsageError

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb-id.txt"


def check_trackers(tensorboard: bool, wandb_project: str | None) -> None:
    """Refuse a tracker whose package is not installed, before a run writes anything (no import:
    a quick look for the packages)."""
    import importlib.util

    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--tensorboard needs the tensorboard package: pip install 'repa-cache[track]' (or pip install tensorboard)")
    if wandb_project and importlib.util.find_spec("wandb") is None:
        raise UsageError("--wandb needs the wandb package: pip install 'repa-cache[track]' (or pip install wandb)")


class Trackers:
    """The metric sinks of one run; :meth:`log` sends a metrics row to each."""

    def __init__(self, run: Path, config: dict[str, Any], tensorboard: bool = False, wandb_project: str | None = None) -> None:
        self.tb: Any = None
        self.wandb: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError("--tensorboard needs the tensorboard package: "
                                 "pip install 'repa-cache[track]' (or pip install tensorboard)") from None
            self.tb = SummaryWriter(str(run / "tb"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise UsageError("--wandb needs the wandb package: pip install 'repa-cache[track]' (or pip install wandb)") from None
            id_file = run / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(8)
            if not (run_id.isalnum() and len(run_id) <= 64):
                raise UsageError(f"{id_file} does not hold a W&B run id")
            id_file.write_text(run_id + "\n")
            self.wandb = wandb.init(project=wandb_project, name=run.name, id=run_id, resume="allow", dir=str(run),
                                    config=config)

    def log(self, row: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in row.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def log_image(self, name: str, image: np.ndarray, step: int) -> None:
        """Send a uint8 (H, W, 3) image, such as a sample grid, to each sink."""
        if self.tb is not None:
            self.tb.add_image(name, image, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(image)}, step=step)

    def close(self) -> None:
        """Flush and close every sink; when it returns, their files hold every row logged.

        ``wandb.finish()`` only asks W&B's service process to close the run: it writes the last
        records of the run's file (``RUN/wandb/*/run-*.wandb``) afterwards, on its own time. So
        unless another W&B run of this process still needs it, the service is shut down here too,
        which waits for it to close every file (a later ``wandb.init`` starts a new one)."""
        try:
            if self.tb is not None:
                self.tb.close()
        finally:
            if self.wandb is not None:
                import wandb

                run, self.wandb = self.wandb, None
                run.finish()
                if wandb.run is None:
                    _shut_down_wandb()


def _shut_down_wandb() -> None:
    """``wandb.teardown()``, which waits for W&B's service process to exit; W&B exits the program
    when that process failed, which a run that has finished its own work reports as a warning."""
    import wandb

    try:
        wandb.teardown()
    except SystemExit as e:
        log.warning("W&B's service process exited with code %s; its files may be incomplete", e.code)
