"""Experiment trackers (mlflow, wandb, tensorboard hooks): what a run logs, read back from the real
stores (an MLflow file store, a W&B offline run, TensorBoard event files), and a missing package
refused before anything is built or written."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from detkit.cli import app
from detkit.config import load_config
from detkit.engine.train import train
from detkit.engine.trackers import TrackerHook, flatten_config, mlflow_key, mlflow_store, record_values

runner = CliRunner()
ONE_EPOCH = ["train.epochs=1"]  # 2 steps, one evaluation at the end


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


# ------------------------------------------------------------------ MLflow
@pytest.fixture
def mlflow_env(monkeypatch, tmp_path):
    """A clean MLflow environment in tmp_path: no tracking URI from outside, the file store not yet allowed."""
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # recorded, so the hook's own setting is undone after
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    return tmp_path


def test_mlflow_logs_config_metrics_plots_and_checkpoint_to_the_default_mlruns(tiny_config, mlflow_env):
    from mlflow.tracking import MlflowClient

    hook = "train.hooks=[{type: mlflow, experiment: tiny-exp, log_checkpoint: true}]"
    run_dir = train(load_config(tiny_config, [*ONE_EPOCH, hook]), out_dir=mlflow_env / "run")
    store = mlflow_env / "mlruns"  # the default: ./mlruns, MLflow's file store
    assert store.is_dir()
    client = MlflowClient(tracking_uri=store.as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("tiny-exp").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params = run.data.params
    assert params["train.optimizer.lr"] == "0.01" and params["model.backbone.type"] == "tiny"
    assert params["data.train.num_images"] == "8" and params["train.epochs"] == "1"
    rid = run.info.run_id
    train_records = records(run_dir, "train")
    history = client.get_metric_history(rid, "train/total")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["total"])) for r in train_records]
    assert [m.step for m in client.get_metric_history(rid, "train/rpn_cls")] == [1, 2]
    (ev,) = records(run_dir, "eval")
    (mAP,) = client.get_metric_history(rid, "eval/voc/mAP")
    assert (mAP.step, mAP.value) == (ev["step"], pytest.approx(ev["voc/mAP"]))
    aps = {k: v for k, v in ev["AP"].items() if v is not None}
    assert aps and all(client.get_metric_history(rid, f"eval/AP/{c}")[0].value == pytest.approx(v)
                       for c, v in aps.items())
    files = {f.path for folder in ("plots", "checkpoints", "images") for f in client.list_artifacts(rid, folder)}
    assert {"plots/pr_curves.png", "plots/losses.png", "checkpoints/best.pt"} <= files
    assert any(f.startswith("images/pr_curves+step+2+") for f in files)  # the image with its step
    local = Path(client.download_artifacts(rid, "plots/pr_curves.png", str(mlflow_env)))
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_resumed_run_continues_its_mlflow_run(tiny_config, mlflow_env):
    from mlflow.tracking import MlflowClient

    hook = "train.hooks=[{type: mlflow, tracking_uri: store}]"
    run_dir = train(load_config(tiny_config, ["train.epochs=1", "eval.interval=0", hook]), out_dir=mlflow_env / "run")
    train(load_config(tiny_config, ["train.epochs=2", "eval.interval=0", hook]), out_dir=run_dir,
          resume=run_dir / "last.pt")
    client = MlflowClient(tracking_uri=(mlflow_env / "store").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("detkit").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/total")] == [1, 2, 3, 4]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "1"  # MLflow keeps a parameter's first value


def test_a_tracker_that_cannot_open_its_run_stops_the_start_and_leaves_no_directory(tiny_config, mlflow_env):
    blocker = mlflow_env / "a-file"
    blocker.write_text("")
    hook = f"train.hooks=[{{type: ema}}, {{type: mlflow, tracking_uri: 'file:{blocker}/mlruns'}}]"
    run_dir = mlflow_env / "runs" / "x"
    result = runner.invoke(app, ["train", str(tiny_config), "--out", str(run_dir), "--set", hook])
    text = result.output.strip()
    assert result.exit_code == 1 and "Traceback" not in text, text
    assert text.splitlines()[-1].startswith("error: train.hooks[1] (mlflow): could not start a run: "), text
    assert not (mlflow_env / "runs").exists()  # the directory and the parent this start created
    mine = mlflow_env / "mine"  # a directory that was there before is left, with what it held
    mine.mkdir()
    (mine / "notes.txt").write_text("kept")
    result = runner.invoke(app, ["train", str(tiny_config), "--out", str(mine), "--set", hook])
    assert result.exit_code == 1 and (mine / "notes.txt").read_text() == "kept"


def test_mlflow_store_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow_store(None) == ((tmp_path / "mlruns").as_uri(), True)
    assert mlflow_store("runs/ml") == ((tmp_path / "runs/ml").as_uri(), True)
    assert mlflow_store("file:rel") == ((tmp_path / "rel").as_uri(), True)
    assert mlflow_store(f"file://{tmp_path}/abs") == ((tmp_path / "abs").as_uri(), True)
    assert mlflow_store("http://host:5000") == ("http://host:5000", False)
    assert mlflow_store("sqlite:///mlflow.db") == ("sqlite:///mlflow.db", False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert mlflow_store(None) == ("http://env:5000", False)
    assert mlflow_key("eval/AP/a+b@0.5") == "eval/AP/a_b_0.5"


# ------------------------------------------------------- Weights & Biases
def wandb_records(path: Path) -> list:
    """The records of a W&B offline run file (``run-<id>.wandb``): a 7-byte header, then 32 KiB
    blocks of chunks (crc32, length, kind: 1 whole, 2 first, 3 middle, 4 last) holding protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, out, pending, pos, block = path.read_bytes(), [], b"", 7, 32768
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # the padded rest of a block
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """W&B with no account and no network: every W&B folder in tmp_path, the server unreachable."""
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # an online run would fail here
    return tmp_path


def test_wandb_offline_logs_config_metrics_plots_and_checkpoint(tiny_config, wandb_env):
    hook = "train.hooks=[{type: wandb, project: tiny, log_checkpoint: true}]"
    run_dir = train(load_config(tiny_config, [*ONE_EPOCH, hook]), out_dir=wandb_env / "run")
    (offline,) = (run_dir / "wandb").glob("offline-run-*")  # offline, in the run directory by default
    (log,) = offline.glob("run-*.wandb")
    recs = wandb_records(log)
    kinds = [r.WhichOneof("record_type") for r in recs]
    (start,) = [r.run for r in recs if r.HasField("run")]
    assert start.project == "tiny" and start.display_name == "run"
    config = {u.key: json.loads(u.value_json) for u in start.config.update}
    config |= {u.key: json.loads(u.value_json) for r in recs if r.HasField("config") for u in r.config.update}
    assert config["train.optimizer.lr"] == 0.01 and config["model.backbone.type"] == "tiny"
    rows: dict[int, dict] = {}
    for r in recs:
        if r.HasField("history"):
            row = {(u.key or "/".join(u.nested_key)): json.loads(u.value_json) for u in r.history.item}
            rows.setdefault(row["_step"], {}).update(row)
    train_records = records(run_dir, "train")
    assert [(s, rows[s]["train/total"]) for s in sorted(rows)] == [
        (r["step"], pytest.approx(r["total"])) for r in train_records]
    (ev,) = records(run_dir, "eval")
    assert rows[ev["step"]]["eval/voc/mAP"] == pytest.approx(ev["voc/mAP"])
    assert rows[ev["step"]]["pr_curves/_type"] == "image-file"
    assert (offline / "files" / rows[ev["step"]]["pr_curves/path"]).read_bytes()[:4] == b"\x89PNG"
    assert rows[ev["step"]]["losses/_type"] == "image-file"  # at the last step
    (artifact,) = [r.artifact for r in recs if r.HasField("artifact")]
    assert artifact.type == "model" and [c.path for c in artifact.manifest.contents] == ["best.pt"]
    assert kinds[-1] == "exit" and recs[-1].exit.exit_code == 0


# ------------------------------------------------------------- TensorBoard
def test_tensorboard_shorthand_writes_scalars_images_and_the_config(tiny_config, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = train(load_config(tiny_config, [*ONE_EPOCH, "train.tensorboard=true"]), out_dir=tmp_path / "run")
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "tensors": 0}).Reload()
    totals = [(e.step, e.value) for e in events.Scalars("train/total")]
    assert totals == [(r["step"], pytest.approx(r["total"])) for r in records(run_dir, "train")]
    (ev,) = records(run_dir, "eval")
    assert events.Scalars("eval/voc/mAP")[0].value == pytest.approx(ev["voc/mAP"])
    assert [i.step for i in events.Images("pr_curves")] == [ev["step"]]
    assert events.Images("losses")[0].encoded_image_string[:4] == b"\x89PNG"
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "lr: 0.01" in text


def test_tensorboard_hook_form_and_shorthand_make_one_hook(tiny_config):
    from detkit.engine.hooks import default_hooks
    from detkit.engine.trackers import TensorBoardHook

    def tb(overrides):
        return [h for h in default_hooks(load_config(tiny_config, overrides)) if isinstance(h, TensorBoardHook)]

    assert tb([]) == []
    (short,) = tb(["train.tensorboard=true"])
    assert short.params.log_dir is None
    (explicit,) = tb(["train.tensorboard=true", "train.hooks=[{type: tensorboard, log_dir: tb}]"])
    assert explicit.params.log_dir == "tb"


# -------------------------------------------------------- missing packages
HIDDEN = [
    ("train.hooks=[{type: mlflow}]", "mlflow", "train.hooks[0].type: hook 'mlflow'", "detkit[mlflow]"),
    ("train.hooks=[{type: ema}, {type: wandb}]", "wandb", "train.hooks[1].type: hook 'wandb'", "detkit[wandb]"),
    ("train.hooks=[{type: tensorboard}]", "tensorboard", "train.hooks[0].type: hook 'tensorboard'",
     "detkit[tensorboard]"),
    ("train.tensorboard=true", "tensorboard", "train.tensorboard: hook 'tensorboard'", "detkit[tensorboard]"),
]


@pytest.mark.parametrize("command", ["validate", "train"])
@pytest.mark.parametrize("override, module, field, extra", HIDDEN,
                         ids=["mlflow", "wandb", "tensorboard-hook", "tensorboard-shorthand"])
def test_a_missing_tracker_package_is_one_line_before_anything_is_built(
        tiny_config, tmp_path, monkeypatch, command, override, module, field, extra):
    import detkit.engine.train as engine

    monkeypatch.setitem(sys.modules, module, None)  # not importable, and find_spec says so

    def never(*args, **kwargs):
        raise AssertionError("the run was built before the missing package was found")

    monkeypatch.setattr(engine.TrainLoop, "__init__", never)
    run_dir = tmp_path / "run"
    args = (["config", "validate", str(tiny_config)] if command == "validate"
            else ["train", str(tiny_config), "--out", str(run_dir)])
    result = runner.invoke(app, [*args, "--set", override])
    text = result.output.strip()
    assert result.exit_code == 2, text
    assert "\n" not in text and "Traceback" not in text, text
    assert text == (f"error: {tiny_config}: {field} needs the {module} package, which is not installed: "
                    f"pip install '{extra}'"), text
    assert not run_dir.exists()  # a failed start leaves nothing: no directory, no config.yaml


def test_installed_trackers_validate(tiny_config):
    for module in ("mlflow", "wandb", "tensorboard"):
        pytest.importorskip(module)
    hooks = "train.hooks=[{type: mlflow}, {type: wandb}, {type: tensorboard}]"
    result = runner.invoke(app, ["config", "validate", str(tiny_config), "--set", hooks])
    assert result.exit_code == 0 and result.output.strip().endswith(": ok"), result.output


def test_sharded_evaluation_hands_rank_0_the_gathered_results_for_the_curves(tiny_config, monkeypatch):
    import torch

    import detkit.engine.distributed as distributed
    from detkit.data.loader import build_dataset, build_loader
    from detkit.registry import registry

    cfg = load_config(tiny_config)
    model = registry("detector").build(cfg.model, num_classes=4)
    loader = build_loader(build_dataset(cfg.data, "val"), batch_size=2, shuffle=False)
    seen = []

    def gather(results, info):  # rank 0 of 2: its shard (images 0, 2) and the other's, interleaved
        seen.extend(r.image_id for r in results)
        return [r for pair in zip(results, reversed(results)) for r in pair]

    monkeypatch.setattr(distributed, "gather_results", gather)
    info = distributed.DistInfo(rank=0, world_size=2)
    out = distributed.evaluate_distributed(model, loader, ["a", "b", "c", "d"], cfg.eval, torch.device("cpu"), info,
                                           keep_results=True)
    assert len(seen) == 2 and [r.image_id for r in out["results"]] == [seen[0], seen[1], seen[1], seen[0]]
    plain = distributed.evaluate_distributed(model, loader, ["a", "b", "c", "d"], cfg.eval, torch.device("cpu"), info)
    assert "results" not in plain  # only when asked: the training's eval_result goes into checkpoints


# ------------------------------------------------------------- the base
class Recorder(TrackerHook):
    tracker = "recorder"

    def __init__(self, fail_after: int = 99):
        super().__init__()
        self.calls: list = []
        self.fail_after = fail_after

    def start(self, params):
        self.calls.append(("start", params["train.epochs"]))

    def log_values(self, values, step):
        if len(self.calls) > self.fail_after:
            raise ConnectionError("server gone")
        self.calls.append((step, values))


def fake_loop(cfg, is_main: bool = True):
    return SimpleNamespace(is_main=is_main, hooks=[], cfg=cfg, step=0)


def test_only_rank_0_logs_and_a_failing_tracker_warns_once_and_the_run_goes_on(tiny_config):
    cfg = load_config(tiny_config)
    other = Recorder()
    other.loop = fake_loop(cfg, is_main=False)
    other.before_train()
    other.on_record({"type": "train", "step": 1, "total": 1.0})
    assert other.calls == [] and not other.active

    main = Recorder(fail_after=1)
    main.loop = fake_loop(cfg)
    main.before_train()
    main.on_record({"type": "train", "step": 1, "total": 1.5, "lr": 0.1, "backbone_frozen": False, "epoch": 0})
    assert main.calls == [("start", 2), (1, {"train/total": 1.5, "train/lr": 0.1})]
    with pytest.warns(RuntimeWarning, match="recorder: logging metrics failed .*server gone.*goes on"):
        main.on_record({"type": "train", "step": 2, "total": 1.0})
    main.on_record({"type": "train", "step": 3, "total": 1.0})  # no second warning: it stopped
    assert len(main.calls) == 2 and not main.active


def test_flatten_and_record_values():
    nested = {"train": {"optimizer": {"type": "sgd", "lr": 0.01}, "hooks": [{"type": "ema"}], "milestones": [8, 11]},
              "name": None, "empty": {}}
    assert dict(flatten_config(nested)) == {"train.optimizer.type": "sgd", "train.optimizer.lr": 0.01,
                                            "train.hooks.0.type": "ema", "train.milestones": [8, 11], "name": None}
    record = {"type": "eval", "epoch": 0, "step": 4, "mAP": 0.5, "best_key": "voc/mAP", "voc/mAP": 0.5,
              "AP": {"cat": 0.25, "dog": None}}
    assert record_values(record) == {"eval/mAP": 0.5, "eval/voc/mAP": 0.5, "eval/AP/cat": 0.25}
