"""Mirror training and evaluation metrics to TensorBoard and/or Weights & Biases.

The JSON-lines files the trainer writes (`metrics.jsonl`, `eval.jsonl`) are the record
of a run: they survive a resume exactly, `resd report` and `resd compare` read them, and
they need no service. A `Tracker` only copies the numeric values of those rows to the
tools people like to watch live. It therefore never raises on a value it cannot show
(strings, lists, None are skipped), and with `report_to=[]` it does nothing at all and
touches no file.

Both back ends are optional dependencies (`pip install resd[logging]`); they are
imported only when asked for, so that `import resd` stays light.

Weights & Biases must work on machines without network access (GPU nodes often have
none): `WANDB_MODE` is respected when set, and when no API key is configured the run is
logged offline under the run directory (`wandb sync <run>/wandb/offline-run-*` uploads
it later) instead of prompting for a login.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import netrc
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb")
INSTALL_HINT = "pip install resd[logging]"
WANDB_HOST = "api.wandb.ai"


def check_trackers(report_to: list[str]) -> None:
    """Fail before any model loads when a tracker's package is missing (the Tracker itself
    is opened last, once the run's state is known)."""
    for name in report_to:
        if importlib.util.find_spec(name) is None:  # the packages are named as the trackers
            raise ValueError(f"report_to: {name} needs the {name} package; {INSTALL_HINT}")


def numeric_items(metrics: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(tag, value) for every number in `metrics`, nested mappings flattened with "/".

    Booleans are shown as 0/1 (a flag such as `finished` is worth a curve); strings,
    lists and None are skipped, as are non-finite values, which both back ends render
    badly or reject.
    """
    for key, value in metrics.items():
        tag = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            yield from numeric_items(value, tag)
        elif isinstance(value, int | float) and math.isfinite(value):  # bool is an int
            yield tag, float(value)


def wandb_api_key_configured(environ: Mapping[str, str] | None = None) -> bool:
    """Whether wandb could log in without asking: WANDB_API_KEY, or a netrc entry for
    its host (where `wandb login` stores the key). Only presence is checked."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY"):
        return True
    path = Path(environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(str(path)).authenticators(WANDB_HOST) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(environ: Mapping[str, str] | None = None) -> str:
    """The wandb mode to run in: WANDB_MODE if set, else online only with an API key."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"]
    return "online" if wandb_api_key_configured(environ) else "offline"


class Tracker:
    """Forward numeric metrics to the trackers named in `report_to`.

    run_dir:     the run directory; TensorBoard events go to `run_dir/tensorboard`,
                 wandb files to `run_dir/wandb`.
    report_to:   any of "tensorboard", "wandb" (TrainConfig.report_to).
    config:      the run's configuration, shown by both tools next to the curves.
    resume_step: the step a resumed run restarts after; TensorBoard hides events of the
                 killed run beyond it (they are redone), wandb continues the same run.
    """

    def __init__(
        self,
        run_dir: Path,
        report_to: list[str],
        config: dict[str, Any],
        *,
        resume_step: int | None = None,
    ) -> None:
        unknown = [name for name in report_to if name not in TRACKERS]
        if unknown:
            raise ValueError(f"report_to: unknown tracker {unknown[0]!r}; choose from {TRACKERS}")
        self.run_dir = Path(run_dir)
        self.report_to = list(report_to)
        self._tensorboard = None
        self._wandb_run = None
        if "tensorboard" in self.report_to:
            self._tensorboard = self._open_tensorboard(config, resume_step)
        if "wandb" in self.report_to:
            self._wandb_run = self._open_wandb(config, resumed=resume_step is not None)

    # ---- back ends --------------------------------------------------------------------
    def _open_tensorboard(self, config: dict[str, Any], resume_step: int | None):
        try:
            # torch's wrapper raises ImportError itself when tensorboard is missing.
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(
                f"report_to: tensorboard needs the tensorboard package; {INSTALL_HINT}"
            ) from exc
        purge = resume_step + 1 if resume_step is not None else None
        writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge)
        if resume_step is None:
            # Markdown code block, so TensorBoard's text tab keeps the indentation.
            text = "```\n" + json.dumps(config, indent=1, default=str) + "\n```"
            writer.add_text("config", text, global_step=0)
        return writer

    def _open_wandb(self, config: dict[str, Any], *, resumed: bool):
        try:
            import wandb
        except ImportError as exc:
            raise ImportError(f"report_to: wandb needs the wandb package; {INSTALL_HINT}") from exc
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # A stable id per run directory, so that a resumed run continues the same wandb run.
        id_file = self.run_dir / "wandb-id.txt"
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:16])
        mode = wandb_mode()
        if mode == "offline" and not os.environ.get("WANDB_MODE"):
            log.info("wandb: no API key configured, logging offline under %s", self.run_dir)
        run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "resd"),
            name=self.run_dir.name,
            id=id_file.read_text().strip(),
            resume="allow" if resumed else None,
            dir=str(self.run_dir),
            config=config,
            mode=mode,
        )
        # Evaluations share the training step axis; logging the step as a metric rather
        # than wandb's own `step=` keeps a resumed run (steps go back) from being dropped.
        run.define_metric("trainer/step")
        run.define_metric("*", step_metric="trainer/step")
        return run

    # ---- API --------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._tensorboard is not None or self._wandb_run is not None

    def log(self, metrics: dict[str, Any], step: int, prefix: str = "") -> None:
        """Mirror the numbers of one metrics row, tagged `prefix/key` (e.g. "eval/...")."""
        if not self.enabled:
            return
        # The step is the x axis, not a curve of its own.
        values = dict(numeric_items({k: v for k, v in metrics.items() if k != "step"}, prefix))
        if self._tensorboard is not None:
            for tag, value in values.items():
                self._tensorboard.add_scalar(tag, value, global_step=step)
        if self._wandb_run is not None:
            self._wandb_run.log({**values, "trainer/step": step})

    def close(self) -> None:
        """Flush and close every back end; safe to call twice."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
