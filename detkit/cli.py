"""The ``detkit`` command line.

Every user error is a :class:`detkit.errors.DetkitError`; the command group
below prints its message on one line and exits with its code (2 for config and
usage errors).  ``--debug`` (or ``DETKIT_DEBUG=1``) shows the traceback too.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, List, Optional

import typer
import yaml
from rich.console import Console
from typer.core import TyperGroup

from detkit.errors import DetkitError, Terminated

console = Console()
err_console = Console(stderr=True)

def _debug_from_env() -> bool:
    return os.environ.get("DETKIT_DEBUG", "") not in ("", "0")


_state = {"debug": _debug_from_env()}


class _Group(TyperGroup):
    """Turns DetkitError into one line on stderr and a non-zero exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except DetkitError as exc:
            distributed = os.environ.get("WORLD_SIZE", "1") != "1"
            if distributed:  # under torchrun: one line for the run, not per rank
                from detkit.engine.distributed import defer_error_to_rank0

                defer_error_to_rank0()
            if _state["debug"]:
                err_console.print(traceback.format_exc(), markup=False, highlight=False)
            err_console.print(f"error: {user_message(exc)}", markup=False, highlight=False, soft_wrap=True)
            if distributed:
                from detkit.engine.distributed import release_process_group

                exc.__traceback__ = None  # its frames hold the run (and its DDP wrapper)
                release_process_group()
            raise typer.Exit(exc.exit_code) from None
        except Terminated:  # SIGTERM: the loop already said where the last checkpoint is
            raise typer.Exit(Terminated.exit_code) from None


def user_message(exc: DetkitError) -> str:
    """The error's own message, also when a DataLoader worker re-raised it.

    A worker's exception comes back with the worker's whole traceback as its
    message; the original message is its last line, after the class name.
    """
    text = str(exc)
    if "Original Traceback" in text:
        last = next((line for line in reversed(text.splitlines()) if line.strip()), text)
        prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
        return last[len(prefix):] if last.startswith(prefix) else last
    return text


def _typer(help: str) -> typer.Typer:
    return typer.Typer(
        cls=_Group,
        help=help,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )


app = _typer("detkit: a plugin-based two-stage object-detection toolkit.")
config_app = _typer("Validate, show and describe configs.")
data_app = _typer("Make and inspect data sets.")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")

SetOption = typer.Option(
    None, "--set", "-s", help="Override a config value: KEY.PATH=VALUE (VALUE read as YAML). Repeatable."
)


def _version(value: bool) -> None:
    if value:
        import detkit

        console.print(f"detkit {detkit.__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    # Set on every invocation: one --debug call (a test, a notebook) must not leave it on for the next.
    _state["debug"] = debug or _debug_from_env()


# --------------------------------------------------------------- list-plugins
@app.command("list-plugins")
def list_plugins(
    kind: Optional[str] = typer.Option(None, "--kind", "-k", help="Only this kind (backbone, detector, ...)."),
    load: bool = typer.Option(False, "--load", help="Import every plugin to check that it loads."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show the installed components: kind, name, distribution, version, target, status."""
    from detkit.registry import all_entries, load_all
    from detkit.plugin_table import plugins_table
    from detkit.registry import registry

    if kind is not None:
        registry(kind)  # unknown kind -> error listing the known ones
    if load:
        load_all()
    entries = all_entries(kind)
    rows = [
        {
            "kind": e.kind,
            "name": e.name,
            "distribution": e.provider.distribution or "-",
            "version": e.provider.version or "-",
            "target": e.provider.target,
            "status": e.status,
        }
        for e in entries
    ]
    if as_json:
        console.print_json(json.dumps(rows))
    problems = [r for r in rows if r["status"].startswith(("failed", "conflict"))]
    from detkit.plugins import unknown_groups
    from detkit.registry import REGISTRIES

    # A misspelt group (detkit.optimiser) would hide its plugins without a word.
    for group in unknown_groups(REGISTRIES):
        err_console.print(group.message(REGISTRIES), markup=False, highlight=False, soft_wrap=True)
    if not as_json:
        console.print(plugins_table(rows))  # one line per plugin, or the target under it when narrow
        # The reasons go below the table, one line each: in a column they would
        # squeeze the table out of an 80-column terminal.
        for r in problems:
            console.print(f"{r['kind']} '{r['name']}' ({r['distribution']} {r['version']}): {r['status']}",
                          markup=False, highlight=False, soft_wrap=True)
        if problems:
            err_console.print(f"{len(problems)} plugin(s) failed to load or conflict.", markup=False, highlight=False)
    if problems:
        raise typer.Exit(1)


# --------------------------------------------------------------------- config
@config_app.command("validate")
def config_validate(path: Path = typer.Argument(..., help="Config file."), overrides: Optional[List[str]] = SetOption) -> None:
    """Check a config, its backbone's real output and that the data's first images exist; prints 'ok' or the problem."""
    from detkit.config import check_backbone, check_requirements, load_config
    from detkit.data.image_check import check_data_images

    cfg = load_config(path, overrides or [])
    check_requirements(cfg, str(path))
    check_backbone(cfg)
    check_data_images(cfg.data, str(path))  # the readers, and their first images are where root says
    console.print(f"{path}: ok", markup=False, highlight=False)


@config_app.command("show")
def config_show(path: Path = typer.Argument(..., help="Config file."), overrides: Optional[List[str]] = SetOption) -> None:
    """Print the config with every default filled in, as YAML."""
    from detkit.config import load_config

    cfg = load_config(path, overrides or [])
    sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON Schema of configs (with every installed plugin's parameters)."""
    from detkit.config import json_schema

    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")


# ---------------------------------------------------------------------- train
@app.command("train")
def train(
    config: Path = typer.Argument(..., help="Config file, e.g. configs/quickstart.yaml."),
    overrides: Optional[List[str]] = SetOption,
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue from this checkpoint (e.g. runs/x/last.pt)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: train.out_dir)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the checkpoints and metrics of a run already in the run directory."),
) -> None:
    """Train a detector as the config describes.

    A run directory that already holds checkpoints is refused: continue it with --resume, pick another with --out,
    or replace it with --overwrite.
    """
    from detkit.api import train as run_training

    run_training(config, overrides or [], resume=resume, out_dir=out_dir, overwrite=overwrite)


# ----------------------------------------------------------------------- eval
@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Argument(..., help="A detkit checkpoint (best.pt, last.pt)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Config to take the data from (default: the checkpoint's)."),
    overrides: Optional[List[str]] = SetOption,
    out: Optional[Path] = typer.Option(
        None, "--out", "-o",
        help="Directory for metrics.json, pr_curves.png, confusion_matrix.png and detections.json "
        "(default: <checkpoint dir>/eval); a path ending in .json names the metrics file.",
    ),
) -> None:
    """Evaluate a checkpoint on the validation split (eval.metric: voc, coco or both)."""
    from detkit.api import evaluate as run_evaluation

    run_evaluation(checkpoint, config=config, overrides=overrides or [], out=out)


# ----------------------------------------------------------------------- data
@data_app.command("synth")
def data_synth(
    out: Path = typer.Argument(..., help="Directory to write the data set into."),
    format: str = typer.Option("voc", "--format", "-f", help="Layout: voc (VOCdevkit) or coco."),
    preset: Optional[str] = typer.Option(
        None, "--preset", help="Named settings: clutter (320-480 px photo-like scenes, distractors, occlusion, "
        "6 classes); writes its train and val splits unless --split is given."
    ),
    num_images: Optional[int] = typer.Option(None, "--num-images", "-n", min=1, help="Number of images (default 100, or the preset's)."),
    seed: int = typer.Option(0, "--seed", help="Base seed of the synthetic data."),
    split: Optional[str] = typer.Option(None, "--split", help="Split name (mixed into the seed; names the split file); default train."),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=32, help="Square image side in pixels (default 128; overrides a preset's size range)."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Comma-separated shapes, e.g. circle,square,triangle."),
    image_format: str = typer.Option("png", "--image-format", help="png (lossless) or jpg (quality 95)."),
) -> None:
    """Write synthetic shapes to disk in VOC or COCO layout, for the file readers."""
    from pydantic import ValidationError

    from detkit.data.export import export_synthetic
    from detkit.data.synthetic import PRESET_SPLITS, SyntheticShapes
    from detkit.errors import ConfigError

    if preset is not None and preset not in PRESET_SPLITS:
        raise ConfigError(f"data synth: --preset: unknown preset {preset!r}; choose from {', '.join(PRESET_SPLITS)}")
    if split is not None or preset is None:
        splits = {split or "train": num_images or (PRESET_SPLITS[preset]["train"] if preset else 100)}
    else:
        splits = dict(PRESET_SPLITS[preset])
        if num_images is not None:  # the train split's size; val keeps the preset's ratio
            splits = {name: max(1, round(num_images * n / splits["train"])) for name, n in splits.items()}
    common: dict[str, Any] = {"seed": seed}
    if preset is not None:
        common["preset"] = preset
    if image_size is not None:
        common.update(image_size=(image_size, image_size), size_range=None)
    elif preset is None:
        common["image_size"] = (128, 128)
    if classes:
        common["classes"] = [c.strip() for c in classes.split(",") if c.strip()]
    from rich.progress import Progress

    for name, count in splits.items():
        try:
            dataset = SyntheticShapes(SyntheticShapes.Params(**common, num_images=count, split=name))
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            raise ConfigError(f"data synth: {'.'.join(map(str, err['loc'])) or 'options'}: {err['msg']}") from None
        with Progress(console=err_console, transient=True) as bar:
            task = bar.add_task(f"writing {name} images", total=count)
            written = export_synthetic(out, format, dataset, image_format=image_format,  # type: ignore[arg-type]
                                       progress=lambda done, total: bar.update(task, completed=done))
        console.print(f"wrote {count} {name} images in {format} layout to {written}",
                      markup=False, highlight=False, soft_wrap=True)


@data_app.command("stats")
def data_stats(
    config: Path = typer.Argument(..., help="Config file."),
    overrides: Optional[List[str]] = SetOption,
    max_images: Optional[int] = typer.Option(None, "--max-images", min=1, help="Only the first N training images."),
    check: bool = typer.Option(False, "--check-images", help="Also decode every train and val image and list the unreadable ones (exit 1 if any)."),
) -> None:
    """Box statistics and anchor coverage of the training split, with suggested anchors.

    Exits 1 on an empty training split, and with --check-images when an image cannot be read.
    """
    from detkit.config import load_config
    from detkit.data.stats import dataset_stats, print_report

    from detkit.data.image_check import check_data_images

    cfg = load_config(config, overrides or [])
    check_data_images(cfg.data, str(config))  # a wrong root: one line naming the field, before the statistics
    checks = _check_images(cfg) if check else []
    print_report(dataset_stats(cfg, max_images, source=str(config)), console)
    bad = sum(len(c.unreadable) for c in checks)
    for c in checks:
        console.print(f"data.{c.split}: {c.checked - len(c.unreadable)} of {c.checked} images decode",
                      markup=False, highlight=False)
        for line in c.unreadable:
            console.print(f"  unreadable: {line}", markup=False, highlight=False, soft_wrap=True)
    if bad:
        err_console.print(f"error: {bad} image(s) cannot be read", markup=False, highlight=False)
        raise typer.Exit(1)


def _check_images(cfg: Any) -> list[Any]:
    """Decode every image of the train and (if set) val split with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from detkit.data.loader import build_dataset
    from detkit.data.stats import check_images

    results = []
    for split in ("train", "val") if cfg.data.val is not None else ("train",):
        dataset = build_dataset(cfg.data, split, augment=False)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=err_console, transient=True) as bar:
            task = bar.add_task(f"decoding data.{split} images", total=len(dataset))
            results.append(check_images(dataset, split, lambda done, total: bar.update(task, completed=done)))
    return results


# ------------------------------------------------------- import and predict
@app.command("import-weights")
def import_weights_cmd(
    src: Path = typer.Argument(
        ..., help="Checkpoint to convert (.pth); with --source torchvision it may be left out (then only DST is "
        "given) to use torchvision's published weights, fetched into $TORCH_HOME when missing."
    ),
    dst: Optional[Path] = typer.Argument(None, help="detkit checkpoint to write."),
    source: str = typer.Option("faster-rcnn-pytorch", "--source", help="Layout of SRC: faster-rcnn-pytorch or torchvision."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="faster-rcnn-pytorch: backbone of SRC, vgg16 or resnet50."),
    model: Optional[str] = typer.Option(None, "--model", help="torchvision: the model of SRC (default fasterrcnn_resnet50_fpn)."),
    classes: Optional[Path] = typer.Option(
        None, "--classes", help="Text file with the foreground class names, one per line, in label order. "
        "torchvision: default its COCO names; another class count keeps all but the class-specific layers."
    ),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="Import config (default: configs/import/faster_rcnn_pytorch_<backbone>.yaml "
        "or configs/import/torchvision_<model>.yaml)."
    ),
    overrides: Optional[List[str]] = SetOption,
) -> None:
    """Convert faster-rcnn-pytorch or torchvision weights into a detkit checkpoint with the same detections."""
    from detkit.engine.import_weights import default_import_config, import_weights
    from detkit.errors import ConfigError

    if dst is None:  # one path: the destination; the weights come from torchvision
        if source != "torchvision":
            raise ConfigError("SRC DST: both are needed unless --source torchvision")
        src, dst = None, src
    if source == "torchvision":
        model = model or "fasterrcnn_resnet50_fpn"
    elif backbone is None:
        raise ConfigError("--backbone: needed for --source faster-rcnn-pytorch (vgg16 or resnet50)")
    config_path = config if config is not None else default_import_config(backbone, source, model)
    written = import_weights(src, dst, config_path, classes, overrides or [], source=source, model=model)
    console.print(f"wrote {written} (config {config_path})", markup=False, highlight=False, soft_wrap=True)


@app.command("predict")
def predict_cmd(
    checkpoint: Path = typer.Argument(..., help="A detkit checkpoint."),
    images: List[Path] = typer.Argument(..., help="Image files, or folders of images."),
    out: Path = typer.Option(Path("predictions"), "--out", "-o", help="Directory for one JSON file per image."),
    score_thresh: Optional[float] = typer.Option(None, "--score-thresh", min=0.0, max=1.0, help="Default: the model's."),
    nms_iou: Optional[float] = typer.Option(None, "--nms-iou", min=0.0, max=1.0, help="Default: the model's."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
    max_detections: Optional[int] = typer.Option(None, "--max-detections", min=1,
                                                 help="Most detections per image, best first. Default: the model's."),
    batch_size: int = typer.Option(8, "--batch-size", min=1,
                                   help="Images per forward pass (only images of one input size share one)."),
    draw: bool = typer.Option(False, "--draw", help="Also write OUT/<image stem>.detections.png with the boxes."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 if any image cannot be read (default: skip it with a warning)."),
) -> None:
    """Detect objects in images; writes OUT/<image stem>.json (boxes in original pixels).

    Unreadable images are skipped with a warning; exit 1 only with --strict or when none could be read.
    """
    from detkit.api import predict_files

    records = predict_files(checkpoint, images, out, score_thresh=score_thresh, nms_iou=nms_iou,
                            max_detections=max_detections, device=device, batch_size=batch_size, draw=draw,
                            strict=strict, console=err_console)
    total = sum(len(r["detections"]) for r in records)
    skipped = len(getattr(records, "skipped", []))
    note = f" ({skipped} unreadable skipped)" if skipped else ""
    console.print(f"{len(records)} images, {total} detections -> {out}{note}", markup=False, highlight=False,
                  soft_wrap=True)


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="A detkit checkpoint."),
    out: Path = typer.Option(..., "--out", "-o", help="The file to write (e.g. model.onnx, model.pt)."),
    format: str = typer.Option("onnx", "--format", "-f", help="onnx or torchscript."),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare the file with predict on the checkpoint's "
                               "validation images (or test images) before writing it; a mismatch writes nothing."),
) -> None:
    """Export the whole inference path (resize to boxes) to ONNX or TorchScript.

    The file takes one uint8 RGB image [3, H, W] of any size and returns boxes [K, 4] in the image's
    pixels, scores [K] and labels [K]. ONNX needs pip install -e ".[export]".
    """
    from detkit.export import export_checkpoint

    path, checked = export_checkpoint(checkpoint, out, format, check=check)  # type: ignore[arg-type]
    note = f"; {checked.line()}" if checked is not None else " (not checked: --no-check)"
    console.print(f"{format} -> {path}{note}", markup=False, highlight=False, soft_wrap=True)
    if checked is not None and checked.compared == 0:  # a check that compared nothing is no pass
        err_console.print(
            f"warning: {path}: the check compared nothing (the model detects nothing on {checked.images}, "
            "even at score_thresh 0); run the file on your own images before relying on it",
            markup=False, highlight=False, soft_wrap=True,
        )


def main() -> None:
    """Console-script entry point."""
    app(prog_name="detkit")


if __name__ == "__main__":
    main()
