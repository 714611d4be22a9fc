"""Experiment trackers as training hooks: ``mlflow``, ``wandb`` and ``tensorboard``.

Each is a plugin hook (``train.hooks: [{type: mlflow, ...}]``) that, on rank 0
only, logs the resolved config as flattened parameters (``train.optimizer.lr``),
every record the loop emits with its step (``train/total``, ``eval/voc/mAP``,
``eval/AP/<class>``), the precision-recall curves of each evaluation and the loss
plot at the end as images, and optionally the checkpoint (``best.pt``, else
``last.pt``) as an artifact.  The packages are optional extras
(``pip install 'detkit[mlflow]'``); a hook whose package is missing is refused
before a run builds anything (:func:`detkit.config.check_requirements` reads each
class's ``requires``).  A resumed run continues the same tracker run: its id is
the hook's checkpoint state.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from detkit.engine.run_dir import say
from detkit.errors import DetkitError
from detkit.interfaces import Hook

RECORD_FIELDS = ("type", "step", "epoch", "best_key")  # bookkeeping, not numbers to plot


def flatten_config(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``{"train": {"optimizer": {"lr": 0.01}}}`` -> ``("train.optimizer.lr", 0.01)``; a list of
    components by index (``data.transforms.0.type``), a list of plain values kept whole."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from flatten_config(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in value):
        for i, item in enumerate(value):
            yield from flatten_config(item, f"{prefix}.{i}")
    elif prefix:
        yield prefix, value


def record_values(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a loop record under ``<type>/<field>`` (per-class AP as ``<type>/AP/<class>``)."""
    prefix = record.get("type", "train")
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in RECORD_FIELDS or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[f"{prefix}/{key}"] = float(value)
        elif isinstance(value, dict):  # "AP": {class: value or None}
            for name, item in value.items():
                if isinstance(item, (int, float)) and not isinstance(item, bool):
                    out[f"{prefix}/{key}/{name}"] = float(item)
    return out


def render_pr_curves(results: list[Any], classes: list[str], eval_cfg: Any, path: Path) -> Path:
    """The per-class precision-recall curves of one evaluation (VOC matching at ``eval.iou_thresh``)."""
    from detkit.evaluation.plots import plot_pr_curves
    from detkit.evaluation.voc import VOCEvaluator

    voc = VOCEvaluator(VOCEvaluator.Params(iou_thresh=eval_cfg.iou_thresh, use_07_metric=eval_cfg.use_07_metric),
                       classes=classes)
    voc.update([r.prediction for r in results], [r.target for r in results])
    curves = voc.pr_curves()
    return plot_pr_curves(curves, voc.compute()["per_class"], path,
                          title=f"precision-recall at IoU {eval_cfg.iou_thresh}")


class TrackerHook(Hook):
    """What the three trackers share; a subclass opens its run (``start``) and says how it logs."""

    priority = 50  # after EvalHook (45): an epoch's evaluation is there in after_epoch
    requires: tuple[tuple[str, str], ...] = ()  # (module, pip requirement) checked at config validation
    tracker = "tracker"
    field = "train.hooks"  # the config entry, for messages (default_hooks sets its index)

    def __init__(self, params: BaseModel | None = None):
        super().__init__(params)
        self.run_id: str | None = None
        self.active = False
        self._eval_step: int | None = None

    @property
    def name(self) -> str:
        return self.tracker

    # ------------------------------------------------------- for subclasses
    def start(self, params: dict[str, Any]) -> None: ...

    def log_values(self, values: dict[str, float], step: int) -> None: ...

    def log_image(self, key: str, path: Path, step: int) -> None: ...

    def log_checkpoint(self, path: Path) -> None: ...

    def finish(self, ok: bool) -> None: ...

    # ---------------------------------------------------------- the hooks
    def before_train(self) -> None:
        loop = self.loop
        if not loop.is_main:  # one run per training, written by rank 0
            return
        from detkit.engine.hooks import EvalHook

        for hook in loop.hooks:  # the curves need the evaluation's per-image results
            if isinstance(hook, EvalHook):
                hook.keep_results = True
        try:
            self.start(dict(flatten_config(loop.cfg.to_dict())))
        except DetkitError:
            raise
        except Exception as exc:
            raise DetkitError(f"{self.field} ({self.tracker}): could not start a run: "
                              f"{type(exc).__name__}: {exc}") from None
        self.active = True

    def _safely(self, what: str, call: Any, *args: Any) -> None:
        """A tracker that fails mid-run (a server gone) warns once and stops; the training goes on."""
        if not self.active:
            return
        try:
            call(*args)
        except Exception as exc:
            self.active = False
            warnings.warn(f"{self.tracker}: {what} failed ({type(exc).__name__}: {exc}); "
                          "the training goes on without it", RuntimeWarning, stacklevel=2)

    def on_record(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        step = int(record.get("step", self.loop.step))
        values = record_values(record)
        if values:
            self._safely("logging metrics", self.log_values, values, step)
        if record.get("type") == "eval":
            self._eval_step = step

    def after_epoch(self) -> None:
        from detkit.engine.hooks import EvalHook

        if not self.active or self._eval_step is None:
            return
        step, self._eval_step = self._eval_step, None
        results = next((h.results for h in self.loop.hooks if isinstance(h, EvalHook) and h.results), None)
        if results:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "pr_curves.png"
                self._safely("the PR-curve plot", lambda: self.log_image(
                    "pr_curves", render_pr_curves(results, self.loop.classes, self.loop.cfg.eval, path), step))

    def after_train(self) -> None:
        if not self.active:
            return
        from detkit.engine.logging import plot_losses

        loop = self.loop
        with tempfile.TemporaryDirectory() as tmp:
            plot = plot_losses(loop.run_dir / "metrics.jsonl", Path(tmp) / "losses.png", loop.loss_names or None)
            if plot is not None:
                self._safely("the loss plot", self.log_image, "losses", plot, loop.step)
        if loop.completed and getattr(self.params, "log_checkpoint", False):
            best, last = loop.run_dir / "best.pt", loop.run_dir / "last.pt"
            path = best if best.is_file() else last
            if path.is_file():
                self._safely("the checkpoint upload", self.log_checkpoint, path)
        ok = loop.completed
        self.active = False
        try:
            self.finish(ok)
        except Exception as exc:
            warnings.warn(f"{self.tracker}: closing the run failed ({type(exc).__name__}: {exc})",
                          RuntimeWarning, stacklevel=2)

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id} if self.run_id else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id") or None


def _png_array(path: Path) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# ----------------------------------------------------------------- MLflow
_MLFLOW_KEY_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-. /")
MLFLOW_PARAM_LENGTH = 6000  # the longest parameter value MLflow stores


def mlflow_key(key: str) -> str:
    """MLflow names allow letters, digits and ``_-. /``; anything else (``@``, a class named ``a+b``) becomes ``_``."""
    return "".join(c if c in _MLFLOW_KEY_OK else "_" for c in key)


def mlflow_store(tracking_uri: str | None) -> tuple[str, bool]:
    """The tracking URI to use and whether it is a local file store: ``tracking_uri``, else
    ``$MLFLOW_TRACKING_URI``, else ``./mlruns``; a plain path becomes an absolute ``file:`` URI."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "mlruns"
    if uri.startswith("file:"):
        from urllib.parse import urlparse

        return Path(urlparse(uri).path).resolve().as_uri(), True
    if ":" not in uri and uri != "databricks":  # a plain directory
        return Path(uri).resolve().as_uri(), True
    return uri, False


class MLflowHook(TrackerHook):
    """``{type: mlflow, tracking_uri, experiment, run_name, log_checkpoint}``: an MLflow run per training."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        tracking_uri: str | None = Field(
            None, description="where runs go (http://host:5000, sqlite:///mlflow.db, a directory); "
            "default $MLFLOW_TRACKING_URI, else the file store ./mlruns")
        experiment: str = Field("detkit", description="experiment name (created when missing)")
        run_name: str | None = Field(None, description="default: the run directory's name")
        tags: dict[str, str] = Field(default_factory=dict)
        log_checkpoint: bool = Field(False, description="upload best.pt (else last.pt) as an artifact at the end")

    requires = (("mlflow", "detkit[mlflow]"),)
    tracker = "mlflow"

    def start(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        p = self.params
        uri, file_store = mlflow_store(p.tracking_uri)
        if file_store:
            # MLflow 3 refuses its file store unless asked: this default is detkit's choice
            # (no database package to install), so ask for it when the user has not decided.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = client = MlflowClient(tracking_uri=uri)
        existing: dict[str, str] = {}
        if self.run_id is not None:  # a resumed training: the same MLflow run, if this store has it
            try:
                run = client.get_run(self.run_id)
                client.update_run(self.run_id, status="RUNNING")
                existing = dict(run.data.params)
            except Exception:
                self.run_id = None
        if self.run_id is None:
            experiment = client.get_experiment_by_name(p.experiment)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(p.experiment)
            run = client.create_run(experiment_id, run_name=p.run_name or self.loop.run_dir.name,
                                    tags={"detkit.run_dir": str(self.loop.run_dir), **p.tags})
            self.run_id = run.info.run_id
        # MLflow refuses to change a logged parameter: a resumed run keeps the values it started with.
        pairs = [Param(mlflow_key(k)[:250], (v if isinstance(v, str) else json.dumps(v))[:MLFLOW_PARAM_LENGTH])
                 for k, v in params.items() if mlflow_key(k)[:250] not in existing]
        for i in range(0, len(pairs), 100):  # MLflow takes at most 100 parameters per call
            client.log_batch(self.run_id, params=pairs[i:i + 100])
        say(self.loop.console, f"mlflow: run {self.run_id} in {uri}")

    def log_values(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(mlflow_key(k), v, now, step) for k, v in values.items()])

    def log_image(self, key: str, path: Path, step: int) -> None:
        self.client.log_image(self.run_id, _png_array(path), key=key, step=step)  # the UI's image slider
        self.client.log_artifact(self.run_id, str(path), "plots")  # the latest one, by its own name

    def log_checkpoint(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path), "checkpoints")

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


# ---------------------------------------------------------- Weights & Biases
class WandbHook(TrackerHook):
    """``{type: wandb, project, mode, entity, dir, run_name, log_checkpoint}``: a W&B run per training."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        project: str = "detkit"
        mode: Literal["offline", "online"] = Field(
            "offline", description="offline: written locally, no network (upload later with `wandb sync`)")
        entity: str | None = None
        dir: str | None = Field(None, description="where W&B writes (default $WANDB_DIR, else the run directory)")
        run_name: str | None = Field(None, description="default: the run directory's name")
        tags: list[str] = Field(default_factory=list)
        log_checkpoint: bool = Field(False, description="log best.pt (else last.pt) as a model artifact at the end")

    requires = (("wandb", "detkit[wandb]"),)
    tracker = "wandb"

    def start(self, params: dict[str, Any]) -> None:
        import wandb

        p = self.params
        directory = Path(p.dir or os.environ.get("WANDB_DIR") or self.loop.run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=p.project, entity=p.entity, dir=str(directory), mode=p.mode, tags=p.tags or None,
            name=p.run_name or self.loop.run_dir.name, config=params, allow_val_change=True,
            id=self.run_id, resume="allow" if self.run_id else None, reinit="create_new",
            # console off: W&B would otherwise wrap stdout, under the progress bar
            settings=wandb.Settings(console="off", silent=True),
        )
        self.run_id = self.run.id
        say(self.loop.console, f"wandb: run {self.run_id} ({p.mode}) in {Path(self.run.dir).parent}")

    def log_values(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        import wandb

        self.run.log({key: wandb.Image(str(path))}, step=step)

    def log_checkpoint(self, path: Path) -> None:
        import wandb

        artifact = wandb.Artifact(f"model-{self.run_id}", type="model", metadata={"file": path.name})
        artifact.add_file(str(path))
        self.run.log_artifact(artifact, aliases=["latest", path.stem])

    def finish(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


# --------------------------------------------------------------- TensorBoard
class TensorBoardHook(TrackerHook):
    """``{type: tensorboard, log_dir}`` (or ``train.tensorboard: true``): event files for TensorBoard."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        log_dir: str | None = Field(None, description="default: <run directory>/tensorboard")

    requires = (("tensorboard", "detkit[tensorboard]"),)
    tracker = "tensorboard"

    def start(self, params: dict[str, Any]) -> None:
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        log_dir = Path(self.params.log_dir) if self.params.log_dir else self.loop.run_dir / "tensorboard"
        self.writer = SummaryWriter(str(log_dir))
        text = yaml.safe_dump(self.loop.cfg.to_dict(), sort_keys=False)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), self.loop.step)  # markdown code

    def log_values(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            if math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_image(self, key: str, path: Path, step: int) -> None:
        self.writer.add_image(key, _png_array(path), step, dataformats="HWC")
        self.writer.flush()

    def finish(self, ok: bool) -> None:
        self.writer.close()

    def state_dict(self) -> dict[str, Any]:
        return {}  # event files need no run id
