"""Model packages: round trip, and every way a package can be tampered with or malformed."""

from __future__ import annotations

import base64
import json
import struct
import zipfile
from pathlib import Path

import pytest

from edgeserve.errors import (
    CorruptPackageError,
    OversizeMemberError,
    PackageError,
    RollbackError,
    SignatureError,
    TamperedFileError,
    TamperedManifestError,
    UnsafeMemberError,
    UntrustedKeyError,
)
from edgeserve.manifest import canonical_json
from edgeserve.package import PackageLimits, PackageWriter, open_package
from edgeserve.signing import sign_manifest
from edgeserve.testing import KeyPair, make_manifest, write_test_package

ARTIFACT = bytes(range(256)) * 16


def _member_data_offset(path: Path, name: str) -> int:
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _rewrite(src: Path, dst: Path, replace: dict[str, bytes | None],
             add: dict[str, bytes] | None = None) -> None:
    """Copy a package member by member, replacing (or dropping, with None) some members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename in replace:
                if replace[info.filename] is not None:
                    zout.writestr(info.filename, replace[info.filename])
            else:
                zout.writestr(info, zin.read(info.filename))
        for name, data in (add or {}).items():
            zout.writestr(name, data)


@pytest.fixture
def pkg(tmp_path: Path, keypair: KeyPair) -> Path:
    out = tmp_path / "toy-1.0.0.edgepkg"
    write_test_package(out, keypair, {"artifacts/model.onnx": ARTIFACT,
                                      "report.json": b'{"ok": true}'})
    return out


def test_round_trip_verifies_and_extracts(pkg: Path, keypair: KeyPair, tmp_path: Path) -> None:
    """A package written and signed by one key opens, verifies and extracts byte-exact."""
    with open_package(pkg, trust=keypair.trust, verify_files=True) as p:
        assert p.verified and p.signed_by == keypair.key_id
        assert p.manifest.files["artifacts/model.onnx"].size == len(ARTIFACT)
        assert p.manifest.artifacts[0].size_bytes == len(ARTIFACT)
        path = p.extract_artifact("onnx-fp32", tmp_path / "out")
    assert path.read_bytes() == ARTIFACT


def test_flipped_artifact_byte_is_tampered_file(pkg: Path, keypair: KeyPair, tmp_path: Path) -> None:
    """One byte flipped in a stored artifact is caught, and nothing is left extracted."""
    _flip(pkg, _member_data_offset(pkg, "artifacts/model.onnx") + 100)
    with open_package(pkg, trust=keypair.trust) as p, pytest.raises(TamperedFileError,
                                                                    match="model.onnx"):
        p.extract_artifact("onnx-fp32", tmp_path / "out")
    assert not any((tmp_path / "out").rglob("*.onnx"))


def test_replaced_artifact_with_valid_crc_is_tampered_file(pkg: Path, keypair: KeyPair,
                                                           tmp_path: Path) -> None:
    """An artifact swapped for same-size bytes (zip CRC fine) fails the manifest's sha256."""
    evil = tmp_path / "evil.edgepkg"
    _rewrite(pkg, evil, {"artifacts/model.onnx": bytes(len(ARTIFACT))})
    with pytest.raises(TamperedFileError, match="does not match the manifest"):
        open_package(evil, trust=keypair.trust, verify_files=True)


def test_flipped_manifest_byte_is_tampered_manifest(pkg: Path, keypair: KeyPair,
                                                    tmp_path: Path) -> None:
    """A manifest edited after signing is reported as such, not as a generic bad signature."""
    with zipfile.ZipFile(pkg) as zf:
        manifest = zf.read("manifest.json")
    edited = manifest.replace(b'"version":"1.0.0"', b'"version":"1.0.1"')
    assert edited != manifest
    evil = tmp_path / "evil.edgepkg"
    _rewrite(pkg, evil, {"manifest.json": edited})
    with pytest.raises(TamperedManifestError, match="modified after signing"):
        open_package(evil, trust=keypair.trust)


def test_flipped_raw_manifest_byte_in_archive(pkg: Path, keypair: KeyPair) -> None:
    """A raw bit flip inside the compressed manifest member is refused as a tampered manifest."""
    _flip(pkg, _member_data_offset(pkg, "manifest.json") + 10)
    with pytest.raises(TamperedManifestError):
        open_package(pkg, trust=keypair.trust)


def test_flipped_signature_byte_is_bad_signature(pkg: Path, keypair: KeyPair,
                                                 tmp_path: Path) -> None:
    """A signature whose bytes were altered is refused with a signature error naming the key."""
    with zipfile.ZipFile(pkg) as zf:
        doc = json.loads(zf.read("signature"))
    raw = bytearray(base64.b64decode(doc["signatures"][0]["sig"]))
    raw[5] ^= 0x01
    doc["signatures"][0]["sig"] = base64.b64encode(bytes(raw)).decode()
    evil = tmp_path / "evil.edgepkg"
    _rewrite(pkg, evil, {"signature": canonical_json(doc)})
    with pytest.raises(SignatureError, match="does not verify") as info:
        open_package(evil, trust=keypair.trust)
    assert not isinstance(info.value, UntrustedKeyError)


def test_unsigned_package_is_refused(pkg: Path, keypair: KeyPair, tmp_path: Path) -> None:
    """A package without a signature member is refused when a trust store is given."""
    evil = tmp_path / "unsigned.edgepkg"
    _rewrite(pkg, evil, {"signature": None})
    with pytest.raises(SignatureError, match="not signed"):
        open_package(evil, trust=keypair.trust)


def test_package_signed_by_unpinned_key(tmp_path: Path, keypair: KeyPair,
                                        other_keypair: KeyPair) -> None:
    """A valid signature by a key the reader does not pin is an untrusted-key error."""
    out = tmp_path / "other.edgepkg"
    write_test_package(out, other_keypair)
    with pytest.raises(UntrustedKeyError, match="none of which is trusted"):
        open_package(out, trust=keypair.trust)


def test_truncated_zip(pkg: Path, keypair: KeyPair) -> None:
    """A download cut in half is reported as a truncated archive."""
    data = pkg.read_bytes()
    pkg.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptPackageError, match="truncated"):
        open_package(pkg, trust=keypair.trust)


def test_not_a_zip(tmp_path: Path, keypair: KeyPair) -> None:
    """A file that is not a zip at all gets its own message."""
    bogus = tmp_path / "bogus.edgepkg"
    bogus.write_bytes(b"hello world" * 10)
    with pytest.raises(CorruptPackageError, match="not a zip"):
        open_package(bogus, trust=keypair.trust)


@pytest.mark.parametrize("name", ["../evil.txt", "/etc/evil", "artifacts/../../evil",
                                  "C:/evil", "a\\..\\evil"])
def test_path_traversal_member(pkg: Path, keypair: KeyPair, tmp_path: Path, name: str) -> None:
    """Members with traversal or absolute names are refused before anything is read."""
    evil = tmp_path / "evil.edgepkg"
    _rewrite(pkg, evil, {}, add={name: b"pwned"})
    with pytest.raises(UnsafeMemberError, match="not a safe relative path"):
        open_package(evil, trust=keypair.trust)
    assert not (tmp_path.parent / "evil.txt").exists()


def test_unlisted_member_is_refused(pkg: Path, keypair: KeyPair, tmp_path: Path) -> None:
    """Extra members the manifest does not pin cannot be smuggled in."""
    evil = tmp_path / "evil.edgepkg"
    _rewrite(pkg, evil, {}, add={"artifacts/extra.bin": b"x"})
    with pytest.raises(UnsafeMemberError, match="not listed"):
        open_package(evil, trust=keypair.trust)


def test_member_larger_than_declared(tmp_path: Path, keypair: KeyPair) -> None:
    """A signed manifest declaring a smaller size than the stored member is refused."""
    manifest = make_manifest()
    writer = PackageWriter(manifest)
    writer.add_file("artifacts/model.onnx", b"a" * 100)
    signed = writer.finalize_manifest()
    files = dict(signed.files)
    files["artifacts/model.onnx"] = files["artifacts/model.onnx"].model_copy(update={"size": 10})
    lying = signed.model_copy(update={"files": files})
    manifest_bytes = lying.canonical_bytes()
    out = tmp_path / "lying.edgepkg"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", manifest_bytes)
        zf.writestr("signature", sign_manifest(manifest_bytes, keypair.private).to_bytes())
        zf.writestr("artifacts/model.onnx", b"a" * 100)
    with pytest.raises(OversizeMemberError, match="declares 10"):
        open_package(out, trust=keypair.trust)


def test_member_over_configured_limit(pkg: Path, keypair: KeyPair) -> None:
    """A member over the reader's configured limit is refused before decompression."""
    with pytest.raises(OversizeMemberError, match="limit of 1000 bytes"):
        open_package(pkg, trust=keypair.trust, limits=PackageLimits(max_member_bytes=1000))


def test_zip_bomb_ratio(tmp_path: Path, keypair: KeyPair) -> None:
    """A highly compressible 64 MiB member trips the compression-ratio limit."""
    out = tmp_path / "bomb.edgepkg"
    manifest = make_manifest()
    writer = PackageWriter(manifest)
    bomb = tmp_path / "zeros.json"  # .json members are deflated
    bomb.write_bytes(bytes(64 << 20))
    writer.add_file("artifacts/model.onnx", b"ok")
    writer.add_file("reference/zeros.json", bomb)
    writer.write(out, keypair.private)
    with pytest.raises(OversizeMemberError, match="compression ratio"):
        open_package(out, trust=keypair.trust)


def test_release_rollback_refused(pkg: Path, keypair: KeyPair) -> None:
    """A package with a lower release number than the installed one is refused."""
    with open_package(pkg, trust=keypair.trust) as p:
        p.check_release(1)
        with pytest.raises(RollbackError, match="older than the installed release 2"):
            p.check_release(2)


def test_inspect_without_trust_is_unverified(pkg: Path) -> None:
    """Opening without a trust store parses the manifest but marks it unverified."""
    with open_package(pkg) as p:
        assert not p.verified
        assert p.manifest.name == "toy"


def test_writer_refuses_unsafe_names(tmp_path: Path) -> None:
    """The writer itself refuses traversal names."""
    writer = PackageWriter(make_manifest())
    with pytest.raises(PackageError):
        writer.add_file("../x", b"x")


def test_published_json_schema_is_current() -> None:
    """docs/manifest.schema.json matches the manifest models (regenerate with `package schema`)."""
    from edgeserve.manifest import manifest_json_schema

    published = json.loads((Path(__file__).parents[2] / "docs" / "manifest.schema.json")
                           .read_text())
    assert published == json.loads(json.dumps(manifest_json_schema()))
