"""How the checkpoints here were made: with detkit at commit 8b3ebb5 (checkpoint format 1, before the
one-forward detector), three tiny models trained 8 steps on the synthetic shapes; their detections on
the two images of :func:`image` (128 x 128, the models' input size, so no resize) went to
detections.json.  Run from a worktree of that commit, with an extra distribution on the path that
declares the roi_head entry point ``multiscale_roi_head = detkit_builtins.roi_head:MultiScaleRoIHead``
(the installed metadata is today's, which no longer lists it)::

    PYTHONPATH=$PWD:$PWD/plugins:<site with that dist-info> python make_old_checkpoints.py OUT

The test imports :func:`image` from here, so the images are the ones the detections were made on.
"""
import json, sys, subprocess, os
from pathlib import Path
import torch


def image(k):
    # deterministic 128x128 uint8 test image: textured background + coloured blocks
    y = torch.arange(128).view(128, 1).expand(128, 128)
    x = torch.arange(128).view(1, 128).expand(128, 128)
    img = torch.stack([(x * 3 + y * (5 + k)) % 64 + 60, (x * (7 + k) + y) % 48 + 90, (x + y * 2) % 80 + 40]).to(torch.uint8)
    blocks = [(10, 20, 50, 70, (230, 30, 30)), (70, 60, 120, 100, (20, 200, 40)), (30, 80, 60, 124, (240, 240, 20))]
    if k == 1:
        blocks = [(5, 5, 60, 40, (30, 30, 230)), (64, 30, 110, 90, (250, 250, 250))]
    for x1, y1, x2, y2, c in blocks:
        img[:, y1:y2, x1:x2] = torch.tensor(c, dtype=torch.uint8).view(3, 1, 1)
    return img

COMMON = ["data.val.num_images=4", "data.batch_size=4", "train.epochs=1",
          "data.num_workers=0", "train.log_interval=1", "eval.interval=0", "train.optimizer.lr=0.02", "train.scheduler={type: cosine, warmup_iters: 0}", "data.train.num_images=32"]
C4 = ["model.backbone.channels=[4,8,8,16]", "model.backbone.tail_features=16", "model.backbone.blocks_per_stage=1",
      "model.rpn.mid_channels=8"]
VARIANTS = {
    "c4_roi_pool": C4 + ["model.roi_head={type: roi_head, pool: roi_pool}"],
    "c4_roi_align": C4,  # the quickstart's roi_align, sampling_ratio 1, aligned
    "fpn": ["model.backbone={type: tiny, channels: [4, 8, 8, 16], blocks_per_stage: 1, out_features: [C3, C4], init: pytorch}",
            "model.neck={type: fpn, out_channels: 8, top_block: maxpool}",
            "model.rpn.mid_channels=null",
            "model.rpn.anchor={sizes: [[16, 32], [48, 64], [96, 128]], ratios: [0.5, 1.0, 2.0]}",
            "model.roi_head={type: multiscale_roi_head, in_features: [P3, P4, P5], representation_size: 16, sampling_ratio: 1, aligned: true}",
            "model.preprocess.size_divisible=32", "data.size_divisor=32"],
}


def main(OUT):
    from detkit.api import load
    OUT.mkdir(parents=True, exist_ok=True)
    images = [image(0), image(1)]
    record = {}
    for name, sets in VARIANTS.items():
        run = OUT / f"run_{name}"
        args = [sys.executable, "-m", "detkit.cli", "train", "configs/quickstart.yaml", "--out", str(run), "--overwrite"]
        for s in COMMON + sets:
            args += ["--set", s]
        subprocess.run(args, check=True)
        ckpt = run / "last.pt"
        det = load(ckpt, "cpu")
        preds = det.predict(images, score_thresh=0.0, nms_iou=0.3)
        record[name] = [{"boxes": p.boxes.tolist(), "scores": p.scores.tolist(), "labels": p.labels.tolist()} for p in preds]
        print(name, [len(p.scores) for p in preds], ckpt.stat().st_size)
    (OUT / "detections.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
