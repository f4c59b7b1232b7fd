"""Float YOLOv8n weights for a GPU without internet, recovered from the shared int8 ONNX model.

The shared model is ultralytics' YOLOv8n exported to ONNX (BatchNorm folded into the
convolutions) and dynamically quantised by onnxruntime: each convolution keeps its float bias
and an int8 weight with one scale and zero point, under the PyTorch parameter's own name
(``model.0.conv.weight_quantized``). Dequantising them, ``(q - zero_point) * scale``, gives the
fused model's weights; they are loaded into ultralytics' YOLOv8n architecture (built from its
YAML, nothing downloaded), and the detections are checked against the ONNX model on the
shared images.

Writes, under ``--out`` (a cache folder, never committed):

- ``yolov8n_from_int8.pt``: an ultralytics checkpoint (``YOLO(path)`` loads it);
- ``yolov8n_from_int8.torchscript``: the same, traced, with its class names; it needs only
  PyTorch, so it is what travels to a GPU machine (``model.name``, ``model.runtime: batched``).

Real users keep the official weights (``yolov8n.pt``): these inherit the int8 rounding.

Usage:
    .venv/bin/python scripts/recover_weights.py [--onnx ../shared/models/yolov8n_int8.onnx] [--out .cache/weights]
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def dequantised(onnx_path: Path) -> tuple[dict[str, np.ndarray], dict[int, str]]:
    """Every float parameter the ONNX graph holds, by PyTorch name, and the class names."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    params: dict[str, np.ndarray] = {}
    for name, value in inits.items():
        if name.endswith(".weight_quantized"):
            base = name.removesuffix("_quantized")
            scale, zero = inits[f"{base}_scale"], inits[f"{base}_zero_point"]
            params[base] = ((value.astype(np.float32) - zero.astype(np.float32)) * scale).astype(np.float32)
        elif name.startswith("model.") and name.endswith((".weight", ".bias")):
            params[name] = value.astype(np.float32)
    meta = {p.key: p.value for p in model.metadata_props}
    names = {int(k): str(v) for k, v in ast.literal_eval(meta["names"]).items()}  # a dict literal, never code
    return params, names


def build(params: dict[str, np.ndarray], names: dict[int, str]) -> object:
    """Ultralytics' fused YOLOv8n with the recovered weights (every parameter checked by name and shape)."""
    import torch
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8n.yaml", nc=len(names), verbose=False).fuse(verbose=False).eval()
    state = model.state_dict()
    missing = [k for k in state if k not in params and not k.endswith(("anchors", "strides"))]
    dfl = "model.22.dfl.conv.weight"
    if missing and missing != [dfl]:
        raise SystemExit(f"the ONNX model lacks {len(missing)} parameters of YOLOv8n, e.g. {missing[:3]}")
    for key, value in params.items():
        if key not in state:
            raise SystemExit(f"the ONNX parameter {key} is not in YOLOv8n: not a YOLOv8n export?")
        if tuple(state[key].shape) != value.shape:
            raise SystemExit(f"{key}: YOLOv8n has shape {tuple(state[key].shape)}, the ONNX model {value.shape}")
        if key == dfl:
            continue  # the fixed 0..15 projection: keep it exact, not int8-rounded
        state[key] = torch.from_numpy(value)
    model.load_state_dict(state)
    model.names = names
    return model


def check(onnx_path: Path, torchscript: Path, shared: Path) -> float:
    """Agreement (F1 of same-label boxes at IoU 0.5) of the recovered model with the ONNX one on the shared images."""
    import cv2

    from bench.experiments import agreement
    from pipeline.codecs import encode_jpeg
    from pipeline.config import ModelConfig
    from pipeline.inference import BatchDetector, StageTimes

    images = [cv2.imread(str(p)) for p in sorted((shared / "images").glob("*.jpg"))]
    jpegs = [encode_jpeg(im, 95) for im in images]
    ours = BatchDetector(ModelConfig(name=str(torchscript), device="cpu")).detect_jpegs(jpegs, StageTimes())
    ref = BatchDetector(ModelConfig(name=str(onnx_path), device="cpu")).detect_jpegs(jpegs, StageTimes())
    for a, b in zip(ours, ref, strict=True):
        print(f"  recovered: {len(a)} boxes {sorted(set(a.labels))}; onnx: {len(b)} boxes {sorted(set(b.labels))}")  # type: ignore[union-attr,arg-type]
    return agreement(dict(enumerate(ours)), dict(enumerate(ref)))  # type: ignore[arg-type]


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, default=ROOT.parent / "shared" / "models" / "yolov8n_int8.onnx")
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "weights")
    parser.add_argument("--imgsz", type=int, default=640)
    args = parser.parse_args()
    params, names = dequantised(args.onnx)
    model = build(params, names)
    args.out.mkdir(parents=True, exist_ok=True)
    pt = args.out / "yolov8n_from_int8.pt"
    torch.save({"model": copy.deepcopy(model).half(), "train_args": {"imgsz": args.imgsz, "task": "detect"}}, pt)
    head = model.model[-1]  # type: ignore[attr-defined]
    head.export, head.format = True, "torchscript"  # the raw (n, 84, anchors) tensor, as the ONNX export
    example = torch.zeros(1, 3, args.imgsz, args.imgsz)
    traced = torch.jit.trace(model, example, strict=False, check_trace=False)
    ts = args.out / "yolov8n_from_int8.torchscript"
    config = {"names": names, "imgsz": [args.imgsz, args.imgsz], "stride": 32, "source": str(args.onnx.name)}
    torch.jit.save(traced, str(ts), _extra_files={"config.txt": json.dumps(config)})
    batch4 = traced(torch.rand(4, 3, args.imgsz, args.imgsz))
    assert tuple(batch4.shape) == (4, 4 + len(names), 8400), batch4.shape
    score = check(args.onnx, ts, args.onnx.parent.parent)
    print(f"wrote {pt} and {ts} ({ts.stat().st_size / 1e6:.1f} MB); agreement with the ONNX model: {score}")


if __name__ == "__main__":
    main()
