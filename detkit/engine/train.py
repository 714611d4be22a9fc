"""The training loop behind ``detkit train``.

One loop for CPU, one GPU and many (``torchrun``).  :class:`TrainLoop` builds
the run (data, detector, trainer, optimizer, schedule, AMP, hooks), restores a
checkpoint when resuming, and then runs::

    before_train
    for each epoch:
        before_epoch
        for each step:   before_step, trainer.run_step (train.accumulate micro-batches), after_step
        after_epoch
    after_train

The step itself belongs to the trainer (kind ``trainer``, e.g. ``FasterRCNNTrainer``:
autocast forward, weighted losses, scaled backward, clip, optimizer step);
the loop only fetches its micro-batches (:class:`detkit.engine.feed.EpochFeed`, which
``TrainLoop`` inherits: loaders, micro-batches, a resumed epoch's samples).  Everything
else (LR schedule, frozen backbone phase, progress and metrics, evaluation, checkpoints,
the loss guard, EMA, plugin hooks) is a hook in :mod:`detkit.engine.hooks`, called in
the documented order.

Run directory: ``config.yaml`` (resolved), ``metrics.jsonl``, ``last.pt``,
``best.pt``, ``losses.png``, ``data_summary.txt`` (boxes clipped or dropped by
the readers, also printed at the start).  It is created only once the config, the data
and the model have been built; one that already holds checkpoints is refused
unless the run resumes or ``overwrite`` is set; leftovers of a save that was
killed mid-write (``.*.tmp``) are removed at the start.  That start (:func:`train`:
device, processes, run directory) is in :mod:`detkit.engine.launch`, re-exported here.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from rich.console import Console
from torch.utils.data import DataLoader

from detkit.config import Config
from detkit.engine.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from detkit.engine.distributed import DistInfo, DistributedHook, barrier
from detkit.engine.feed import EpochFeed, LossWindow
from detkit.engine.hooks import default_hooks, sort_hooks
from detkit.engine.launch import DATA_SUMMARY, box_summary, seed_everything, train  # noqa: F401 (re-exported)
from detkit.interfaces import Hook
from detkit.engine.optim import build_optimizer, build_scheduler
from detkit.engine.resume_plan import add_samples
from detkit.engine.run_dir import RUN_FILES, check_run_dir, clear_run_dir, first_missing_dir, prepare_run_dir, remove_empty_dirs, run_dir_for, say as _say  # noqa: F401 (re-exported)
from detkit.errors import CheckpointError, ConfigError, DetkitError, Terminated
from detkit.registry import registry, without_pretrained

# Batch shapes cuDNN may time under train.cudnn_benchmark: auto.
CUDNN_AUTO_MAX_SHAPES = 8


def init_model_weights(model: torch.nn.Module, path: str | Path, classes: list[str]) -> None:
    """Load the model weights of the detkit checkpoint ``path`` (``train.init_weights``) into ``model``."""
    ckpt = load_checkpoint(path)
    if list(ckpt["classes"]) != list(classes):
        raise ConfigError(
            f"train.init_weights: {path} was made for classes {list(ckpt['classes'])[:5]}"
            f"{'...' if len(ckpt['classes']) > 5 else ''} ({len(ckpt['classes'])}), the data has "
            f"{list(classes)[:5]}{'...' if len(classes) > 5 else ''} ({len(classes)}); import it with "
            "`detkit import-weights ... --classes` naming the data's classes"
        )
    load_model_state(model, ckpt["model"], f"train.init_weights: {path}")


class TrainLoop(EpochFeed):
    """One training run: what hooks see as ``self.loop``.

    Built objects: ``cfg``, ``run_dir``, ``device``, ``dist`` (rank, world size),
    ``is_main``, ``console``, ``classes``, ``train_set``, ``val_set``, ``model``
    (the :class:`~detkit.interfaces.Detector`), ``trainer`` (its ``module`` is
    what the forward pass runs through: the model, or its DistributedDataParallel
    wrapper), ``optimizer``, ``scheduler``, ``amp`` (the trainer's), ``hooks``.

    Progress: ``epoch`` (0-based, current), ``epochs``, ``epoch_steps`` (optimizer
    steps per epoch), ``total_steps``, ``step`` (optimizer steps done in the
    run), ``epoch_step`` (done in this epoch), ``accumulate``, ``losses`` (the
    last step's named losses, detached tensors), ``loss_names``, ``window``
    (:class:`LossWindow`), ``step_images`` (images in the last step, all ranks),
    ``augment_boxes`` (this epoch's ``[kept, dropped]`` ground-truth boxes after
    augmentation, this process's batches),
    ``backbone_frozen``, ``eval_result``, ``best_metric``, ``improved``,
    ``training_started`` (every hook's ``before_train`` ran), ``completed``, ``stop_requested``.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        console: Console,
        device: torch.device,
        dist_info: DistInfo,
        hooks: list[Hook] | None = None,
    ):
        self.cfg = cfg
        self.run_dir = run_dir
        self.console = console
        self.device = device
        self.dist = dist_info
        self.is_main = dist_info.is_main
        tc = cfg.train
        self.epochs = tc.epochs
        self.accumulate = tc.accumulate
        self.epoch = self.start_epoch = 0
        self.step = self.epoch_step = self.start_epoch_step = 0
        self.losses: dict[str, torch.Tensor] = {}
        self.loss_names: list[str] = []
        self.window = LossWindow()
        self.step_images = 0
        self.augment_boxes = [0, 0]  # this epoch's boxes on this process: [kept, dropped by augmentation]
        self.backbone_frozen = False
        self.eval_result: dict[str, Any] | None = None
        self.best_metric = -math.inf
        self.improved = False
        self.completed = False
        self.training_started = False  # every hook's before_train ran
        self.stop_requested: str | None = None
        self.saved_step: int | None = None
        self.t_start = time.perf_counter()
        self._loaders: dict[int, DataLoader] = {}
        # A mid-epoch resume: (epoch, its untrained samples, their micro-batches, the saved segments).
        self._resumed: tuple[int, list[Any], int, list[dict[str, Any]]] | None = None
        self._epoch_segments: list[dict[str, Any]] = []  # how this epoch was trained before this run
        self._epoch_samples = 0  # samples this rank took in this epoch, in this run
        self._build()
        self.hooks: list[Hook] = []
        self.register_hooks(default_hooks(cfg) if hooks is None else hooks)
        if dist_info.enabled:
            self.register_hooks([DistributedHook(tc.sync_bn, tc.find_unused_parameters)])

    # ------------------------------------------------------------- building
    def _build(self) -> None:
        from detkit.data.image_check import check_split_images
        from detkit.data.loader import build_dataset

        cfg, tc = self.cfg, self.cfg.train
        self.train_set = build_dataset(cfg.data, "train", seed=tc.seed)
        self.val_set = (build_dataset(cfg.data, "val", seed=tc.seed)
                        if cfg.data.val is not None and cfg.eval.interval else None)
        self.classes = list(self.train_set.classes)
        if self.val_set is not None and list(self.val_set.classes) != self.classes:
            raise ConfigError(f"data.val: classes {list(self.val_set.classes)} differ from data.train's {self.classes}")
        if len(self.train_set) == 0:
            raise DetkitError("data.train: the training split has no images")
        for split, dataset in (("train", self.train_set), ("val", self.val_set)):
            check_split_images(dataset, split)  # a wrong root: now, not at the first batch

        # Weights from train.init_weights make the backbone's ImageNet file pointless: not loaded.
        model_cfg = cfg.model if tc.init_weights is None else without_pretrained(cfg.model.to_dict())
        self.model = registry("detector").build(model_cfg, num_classes=len(self.classes)).to(self.device)
        if tc.init_weights is not None:
            init_model_weights(self.model, tc.init_weights, self.classes)
        self.optimizer = build_optimizer(self.model, tc.optimizer)
        # The trainer owns the step and its mixed precision; under torchrun DistributedHook
        # points trainer.module at the DistributedDataParallel wrapper of the model.
        self.trainer = registry("trainer").build(tc.trainer, model=self.model, optimizer=self.optimizer, amp=tc.amp)
        self.amp = self.trainer.amp
        # cudnn_benchmark "auto": on until more than CUDNN_AUTO_MAX_SHAPES batch shapes were seen.
        self._cudnn_shapes: set[tuple[int, ...]] | None = None
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = bool(tc.cudnn_benchmark)
            if tc.cudnn_benchmark == "auto":
                self._cudnn_shapes = set()
        if tc.compile:  # in place (nn.Module.compile): parameter names and checkpoints stay the same
            parts = self.model.compile_modules()
            if not parts:
                _say(self.console, f"warning: train.compile: {cfg.model.type} names no modules to compile "
                                   "(Detector.compile_modules); training uncompiled")
            for part in parts:
                part.compile()
        if self._cudnn_shapes is not None:  # the batch shapes the network sees, after preprocessing
            self.model.preprocess.register_forward_hook(self._watch_batch_shapes)

        micro = [self._micro_batches(e) for e in range(self.epochs)]
        self.epoch_steps = [-(-m // self.accumulate) for m in micro]
        self.total_steps = sum(self.epoch_steps)
        self.scheduler = build_scheduler(self.optimizer, tc.scheduler, self.epoch_steps)

    def register_hooks(self, hooks: list[Hook]) -> None:
        """Add hooks (kept sorted by priority); each gets ``hook.loop = self``."""
        for hook in hooks:
            hook.loop = self
        self.hooks = sort_hooks(self.hooks + list(hooks))

    def _watch_batch_shapes(self, module: Any, inputs: Any, output: Any) -> None:
        """``train.cudnn_benchmark: auto``: cuDNN times its algorithms once per new input shape,
        which pays while the shapes are few and costs seconds per step when every batch is new."""
        shapes = self._cudnn_shapes
        if shapes is None or not torch.is_grad_enabled():
            return
        shapes.add(tuple(output[0].tensor.shape))
        if len(shapes) > CUDNN_AUTO_MAX_SHAPES:
            torch.backends.cudnn.benchmark = False
            self._cudnn_shapes = None
            _say(self.console, f"cudnn.benchmark off: more than {CUDNN_AUTO_MAX_SHAPES} batch shapes "
                               "(set train.cudnn_benchmark: true to keep it)")

    def log_now(self) -> bool:
        """Whether this step ends a logging window (every ``train.log_interval`` steps and at epoch ends)."""
        return self.step % self.cfg.train.log_interval == 0 or self.epoch_step == self.epoch_steps[self.epoch]

    # ---------------------------------------------------------------- loop
    def call(self, event: str) -> None:
        for hook in self.hooks:
            getattr(hook, event)()

    def emit(self, record: dict[str, Any]) -> None:
        """Hand a record (``type``: "train", "eval", ...) to every hook: metrics file, display, plugins."""
        for hook in self.hooks:
            hook.on_record(record)

    def request_stop(self, reason: str) -> None:
        """End the run after this step; the checkpoint hook saves it first."""
        self.stop_requested = reason

    @contextmanager
    def eval_weights(self) -> Iterator[None]:
        """The model holds the weights to evaluate and save (EMA, if a hook keeps one)."""
        with ExitStack() as stack:
            for hook in self.hooks:
                stack.enter_context(hook.eval_weights())
            yield

    @contextmanager
    def _sigterm_handler(self) -> Iterator[None]:
        """SIGTERM (schedulers, ``docker stop``) is handled like Ctrl-C.

        With ``train.checkpoint_every_iters`` (and one process) the current
        step finishes and is saved to ``last.pt`` before the run ends; otherwise,
        or at a second SIGTERM, the step is abandoned at once.  Either way the
        last line says where the last checkpoint is, and the exit code is 143.
        """
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            graceful = bool(self.cfg.train.checkpoint_every_iters) and not self.dist.enabled
            if graceful and not self.terminated and self.stop_requested is None:
                self.terminated = True
                last = self.run_dir / "last.pt"
                self.request_stop(f"received SIGTERM; {last} holds this step (continue with --resume {last})")
                return
            self.terminated = True
            raise Terminated()

        previous = signal.signal(signal.SIGTERM, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def run(self) -> Path:
        self.terminated = False
        with self._sigterm_handler():
            run_dir = self._run()
        if self.terminated:  # stopped cleanly after saving: still not a finished run
            raise Terminated()
        return run_dir

    def _run(self) -> Path:
        self.t_start = time.perf_counter()
        started: list[Hook] = []
        try:
            for hook in self.hooks:
                hook.before_train()
                started.append(hook)
            self.training_started = True
            for self.epoch in range(self.start_epoch, self.epochs):
                skip = self.start_epoch_step if self.epoch == self.start_epoch else 0
                self.epoch_step = skip
                self._epoch_segments = self._resumed[3] if skip and self._resumed else []
                self._epoch_samples = 0
                self.augment_boxes = [0, 0]
                self.model.train()
                self.call("before_epoch")
                batches = self.batches(self.epoch, skip)
                micro_total = self._micro_batches(self.epoch)
                while self.epoch_step < self.epoch_steps[self.epoch]:
                    self.call("before_step")
                    n = min(self.accumulate, micro_total - self.epoch_step * self.accumulate)
                    self.losses = self.optimizer_step(batches, n)
                    self._epoch_samples += self.step_images // self.dist.world_size
                    self.loss_names += [n for n in self.losses if n not in self.loss_names]
                    self.window.add(self.losses)
                    self.step += 1
                    self.epoch_step += 1
                    self.call("after_step")
                    if self.stop_requested:
                        if self.saved_step != self.step:
                            self.save_checkpoint(self.run_dir / "last.pt")
                        break
                if self.stop_requested:
                    break
                self.call("after_epoch")
                barrier(self.dist)  # the others wait while rank 0 evaluates and writes
            self.completed = self.stop_requested is None
            if self.stop_requested:
                _say(self.console, f"stopped at step {self.step}: {self.stop_requested}")
        except KeyboardInterrupt as exc:
            last = self.run_dir / "last.pt"
            how = " by SIGTERM" if isinstance(exc, Terminated) else ""
            if self.is_main and last.exists():
                held = f"step {self.saved_step}" if self.saved_step is not None else "the last saved step"
                _say(self.console, f"interrupted{how} at step {self.step}; {last} holds {held} "
                                   f"(continue with --resume {last})")
            elif self.is_main:
                _say(self.console, f"interrupted{how} at step {self.step}, before the first checkpoint")
            raise
        finally:
            failing = not self.completed and self.stop_requested is None
            for hook in started:
                try:
                    hook.after_train()
                except Exception:
                    if not failing:
                        raise
        return self.run_dir

    # ---------------------------------------------------------- checkpoints
    def _hook_key(self, hook: Hook, index: int) -> str:
        same = [h for h in self.hooks if h.name == hook.name]
        return hook.name if len(same) == 1 else f"{hook.name}.{same.index(hook)}"

    def save_checkpoint(self, path: Path) -> None:
        """Everything a resumed run needs, written atomically by rank 0."""
        if not self.is_main:
            return
        ends_epoch = self.epoch_step >= self.epoch_steps[self.epoch]
        epoch, epoch_step = (self.epoch + 1, 0) if ends_epoch else (self.epoch, self.epoch_step)
        progress = [] if ends_epoch else add_samples(self._epoch_segments, self._segment(self.epoch),
                                                     self._epoch_samples)
        with self.eval_weights():
            hook_state = {self._hook_key(h, i): s for i, h in enumerate(self.hooks) if (s := h.state_dict())}
            save_checkpoint(
                path, model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                epoch=epoch, step=self.step, epoch_step=epoch_step, best_map=self.best_metric,
                # Samples taken in the unfinished epoch, by whom and in what batches: a resume
                # continues at the next sample whatever its own batch size (resume_plan).
                epoch_progress=progress, epoch_samples=sum(p["samples"] * p["world_size"] for p in progress),
                config=self.cfg.to_dict(), classes=self.classes, metrics=self.eval_result or {},
                # Target sampling draws from the global generators: restoring them
                # makes a resumed run continue exactly as an uninterrupted one.
                rng_state=torch.get_rng_state(),
                trainer_state=self.trainer.state_dict(),
                cuda_rng_state=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                hooks=hook_state,
            )
        if path.name == "last.pt":
            self.saved_step = self.step

    def resume(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location=self.device)
        if list(ckpt["classes"]) != self.classes:
            raise CheckpointError(f"{path}: trained for classes {list(ckpt['classes'])}, this config has {self.classes}")
        load_model_state(self.model, ckpt["model"], str(path))
        for name, obj in (("optimizer", self.optimizer), ("scheduler", self.scheduler)):
            if ckpt.get(name) is not None:
                obj.load_state_dict(ckpt[name])
        if ckpt.get("scaler"):  # checkpoints of the earlier layout kept the scaler beside the trainer
            self.amp.load_state_dict(ckpt["scaler"])
        self.start_epoch, self.step = int(ckpt.get("epoch", 0)), int(ckpt.get("step", 0))
        self.start_epoch_step = int(ckpt.get("epoch_step", 0))
        self._plan_resumed_epoch(ckpt, path)
        if ckpt.get("trainer_state") is not None:
            self.trainer.load_state_dict(ckpt["trainer_state"])
        if ckpt.get("rng_state") is not None:
            torch.set_rng_state(ckpt["rng_state"].cpu())
        if ckpt.get("cuda_rng_state") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["cuda_rng_state"]])
        self.best_metric = float(ckpt.get("best_map", -math.inf))
        states = dict(ckpt.get("hooks") or {})
        for i, hook in enumerate(self.hooks):
            state = states.pop(self._hook_key(hook, i), None)
            if state is not None:
                hook.load_state_dict(state)
        if "ema" in states:
            _say(self.console, f"warning: {path} was trained with train.ema; without it this run continues "
                               "from the averaged weights")
        where = f"epoch {self.start_epoch}" + (f" + {self.start_epoch_step} steps" if self.start_epoch_step else "")
        _say(self.console, f"resumed from {path}: {where}, step {self.step}")
        if self.start_epoch >= self.epochs:
            _say(self.console, f"nothing to do: the checkpoint already finished {self.start_epoch} epochs")
