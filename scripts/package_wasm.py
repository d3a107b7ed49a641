"""Writes the kvmesh filter as an OCI image layout Istio can pull (see
scripts/package-wasm). Byte-for-byte reproducible: fixed timestamps and
ownership, so the same plugin.wasm always gives the same digests."""

import argparse
import gzip
import hashlib
import io
import json
import pathlib
import shutil
import tarfile

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def layer_tar(wasm):
    """An uncompressed tar with plugin.wasm at its root."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("plugin.wasm")
        info.size = len(wasm)
        info.mode = 0o644
        info.mtime = 0
        tar.addfile(info, io.BytesIO(wasm))
    return buffer.getvalue()


def write_blob(layout, data):
    digest = sha256(data)
    path = layout / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--wasm", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tag", default="0.1.0")
    args = parser.parse_args()

    wasm = pathlib.Path(args.wasm).read_bytes()
    out = pathlib.Path(args.out)
    layout = out / "kvmesh-filter-oci"
    shutil.rmtree(layout, ignore_errors=True)
    layout.mkdir(parents=True)
    (out / "plugin.wasm").write_bytes(wasm)

    tar = layer_tar(wasm)
    layer = write_blob(layout, gzip.compress(tar, mtime=0))
    config = write_blob(layout, json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{sha256(tar)}"]},
    }, sort_keys=True).encode())
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, **config},
        "layers": [{"mediaType": LAYER, **layer}],
        "annotations": {"org.opencontainers.image.title": "kvmesh-filter"},
    }, sort_keys=True).encode()
    manifest_ref = write_blob(layout, manifest)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_text(json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": MANIFEST,
            **manifest_ref,
            "annotations": {"org.opencontainers.image.ref.name": args.tag},
        }],
    }, sort_keys=True))

    tarball = out / "kvmesh-filter-oci.tar"
    with tarfile.open(tarball, "w", format=tarfile.PAX_FORMAT) as archive:
        for path in sorted(layout.rglob("*")):
            info = archive.gettarinfo(str(path), str(path.relative_to(layout)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if path.is_file():
                with open(path, "rb") as f:
                    archive.addfile(info, f)
            else:
                archive.addfile(info)

    print(f"plugin.wasm:        {out / 'plugin.wasm'}")
    print(f"plugin.wasm sha256: {sha256(wasm)}   (EnvoyFilter sha256 with an https:// uri)")
    print(f"image layout:       {layout} (tag {args.tag})")
    print(f"image tarball:      {tarball}")
    print(f"image digest:       {manifest_ref['digest']}   (EnvoyFilter sha256 with an oci:// uri: the hex part)")


if __name__ == "__main__":
    main()
