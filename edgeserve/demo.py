"""``edgeserve demo``: the whole system on embedded defaults.

This first version shows the foundation end to end: a real model (logistic regression trained on
scikit-learn's bundled iris data, written as ONNX), a signed package, verification with a pinned
key, and refusal of a tampered copy. Later parts (converter, agent, fleet) extend it.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import zipfile
from pathlib import Path

import click
import numpy as np

from .console import console, table
from .errors import PackageError
from .manifest import parse_manifest
from .package import PackageWriter, open_package
from .profiles import list_profiles
from .signing import TrustStore, load_private_key, write_keypair

__all__ = ["demo"]


def _train_iris_onnx(out: Path) -> float:
    """Softmax regression on iris by gradient descent; written as a 2-node ONNX graph."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    mean, std = x.mean(0), x.std(0)
    xs = (x - mean) / std
    w, b = np.zeros((4, 3)), np.zeros(3)
    onehot = np.eye(3)[y]
    for _ in range(500):
        logits = xs @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        w -= 0.5 * xs.T @ (p - onehot) / len(x)
        b -= 0.5 * (p - onehot).mean(0)
    accuracy = float(((xs @ w + b).argmax(1) == y).mean())
    # fold the standardisation into the weights: (x - m)/s @ w + b = x @ (w/s) + (b - m/s @ w)
    wf = (w / std[:, None]).astype(np.float32)
    bf = (b - (mean / std) @ w).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["z"]), helper.make_node("Add", ["z", "B"], ["y"])],
        "iris", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(wf, "W"), numpy_helper.from_array(bf, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, out)
    return accuracy


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the demo's files here (default: a temporary directory).")
@click.option("--no-wait", is_flag=True, help="Exit when done (for CI).")
def demo(out: Path | None, no_wait: bool) -> None:
    """Run the end-to-end demo on embedded defaults."""
    work = out or Path(tempfile.mkdtemp(prefix="edgeserve-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    console.rule("edgeserve demo")
    console.print(table("hardware profiles", ["name", "class", "builds"],
                        [(p.name, p.device_class, ", ".join(t.key for t in p.artifacts))
                         for p in list_profiles()]))
    keyid = write_keypair(work / "demo.key", work / "demo.pub.pem", overwrite=True)
    console.print(f"signing key {keyid[:16]} written to {work}")
    accuracy = _train_iris_onnx(work / "iris.onnx")
    console.print(f"trained iris classifier: training accuracy {accuracy:.3f}")
    digest = hashlib.sha256((work / "iris.onnx").read_bytes()).hexdigest()
    manifest = parse_manifest({
        "name": "iris", "version": "1.0.0", "release": 1, "task": "classification",
        "source": {"framework": "onnx", "sha256": digest, "filename": "iris.onnx"},
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4], "layout": "NC"}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 3]}],
        "labels": ["setosa", "versicolor", "virginica"],
        "artifacts": [{"id": "onnx-fp32", "format": "onnx", "precision": "fp32",
                       "path": "artifacts/iris.onnx", "profiles": ["generic-cpu"]}],
    })
    writer = PackageWriter(manifest)
    writer.add_file("artifacts/iris.onnx", work / "iris.onnx")
    pkg = work / "iris-1.0.0.edgepkg"
    writer.write(pkg, load_private_key(work / "demo.key"))
    trust = TrustStore.from_paths([work / "demo.pub.pem"])
    with open_package(pkg, trust=trust, verify_files=True) as opened:
        console.print(f"[green]verified[/] {pkg.name}: signed by {(opened.signed_by or '')[:16]}, "
                      f"{len(opened.manifest.files)} file(s) match")
    tampered = work / "iris-tampered.edgepkg"
    shutil.copy(pkg, tampered)
    with zipfile.ZipFile(pkg) as zin, zipfile.ZipFile(tampered, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.startswith("artifacts/"):
                data = data[:-1] + bytes([data[-1] ^ 1])
            zout.writestr(info, data)
    try:
        with open_package(tampered, trust=trust, verify_files=True):
            raise click.ClickException("a tampered package verified: this is a bug")
    except PackageError as exc:
        console.print(f"[green]refused[/] tampered copy: {exc}")
    console.rule("done")
