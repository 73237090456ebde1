#!/usr/bin/env python3
"""Writes a single-layer, FROM-scratch container image as an OCI image layout in a tar.

No Docker, no registry: the layout is plain files (oci-layout, index.json, blobs/sha256/*),
which `ctr images import`, `kind load image-archive`, `skopeo copy oci-archive:...`,
`podman load` and `docker load` (it also gets a Docker-style manifest.json) all read.

Reproducible: every tar entry has the same mtime (SOURCE_DATE_EPOCH, default 0), uid/gid 0
and a sorted position, and gzip carries no name or time, so the same binary and arguments
give the same digests byte for byte.

    oci.py --out wsrelay.oci.tar --name ghcr.io/wsrelay/wsrelay:0.1.0 \\
        --file /usr/local/bin/wsrelay=target/.../wsrelay --passwd \\
        --entrypoint /usr/local/bin/wsrelay --user 65532:65532 --port 8080/tcp \\
        --label org.opencontainers.image.version=0.1.0

`oci.py --check ARCHIVE` re-reads an archive and verifies every digest and size.
"""

import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
# What containerd's importer reads first for the image name; ref.name is the OCI one.
CONTAINERD_NAME = "io.containerd.image.name"
REF_NAME = "org.opencontainers.image.ref.name"

# /etc/passwd and /etc/group, shared with the Dockerfiles: root and nonroot (65532, the
# distroless convention), the user the operator's Deployments run as.
ROOTFS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rootfs")


def tar_bytes(entries, mtime):
    """A tar of (path, mode, bytes or None for a directory), sorted, owned by 0:0."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path, mode, data in sorted(entries, key=lambda e: e[0]):
            info = tarfile.TarInfo(path)
            info.mode, info.mtime = mode, mtime
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def parents(path):
    """usr/local/bin/x -> usr/, usr/local/, usr/local/bin/."""
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) + "/" for i in range(len(parts))]


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def build(args):
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH") or 0)
    files = {}
    for spec in args.file:
        dest, _, src = spec.partition("=")
        with open(src, "rb") as f:
            files[dest.lstrip("/")] = (0o755, f.read())
    if args.passwd:
        for name in ("etc/passwd", "etc/group"):
            with open(os.path.join(ROOTFS, name), "rb") as f:
                files[name] = (0o644, f.read())
        # A world-writable /tmp, as distroless has; under Kubernetes the root filesystem is
        # read-only and an emptyDir is mounted here.
        files["tmp/"] = (0o1777, None)
    entries = {}
    for path, (mode, data) in files.items():
        for d in parents(path.rstrip("/")):
            entries.setdefault(d, (0o755, None))
        entries[path] = (mode, data)
    layer_tar = tar_bytes([(p, m, d) for p, (m, d) in entries.items()], mtime)
    gz = io.BytesIO()
    # No file name and mtime 0 in the gzip header: same tar, same blob.
    with gzip.GzipFile(filename="", mode="wb", fileobj=gz, mtime=0, compresslevel=9) as g:
        g.write(layer_tar)
    layer = gz.getvalue()

    created = datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc)
    created = created.strftime("%Y-%m-%dT%H:%M:%SZ")
    labels = dict(label.split("=", 1) for label in args.label)
    config = {
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": args.user,
            "Entrypoint": args.entrypoint,
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            "WorkingDir": "/",
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [sha(layer_tar)]},
        "history": [{"created": created, "created_by": "images/oci.py (see images/build.sh)"}],
    }
    if args.cmd:
        config["config"]["Cmd"] = args.cmd
    if args.port:
        config["config"]["ExposedPorts"] = {p: {} for p in args.port}
    if args.stop_signal:
        config["config"]["StopSignal"] = args.stop_signal
    config_blob = canonical(config)

    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": sha(config_blob), "size": len(config_blob)},
        "layers": [{"mediaType": LAYER, "digest": sha(layer), "size": len(layer)}],
        "annotations": {
            "org.opencontainers.image.created": created,
            **{k: v for k, v in labels.items() if k.startswith("org.opencontainers.image.")},
        },
    }
    manifest_blob = canonical(manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [
            {
                "mediaType": MANIFEST,
                "digest": sha(manifest_blob),
                "size": len(manifest_blob),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {REF_NAME: args.name, CONTAINERD_NAME: args.name},
            }
        ],
    }
    blobs = {sha(b)[len("sha256:"):]: b for b in (layer, config_blob, manifest_blob)}
    # `docker load` before Docker 25 needs this; later ones and everything else use index.json.
    docker_manifest = [
        {
            "Config": "blobs/sha256/" + sha(config_blob)[len("sha256:"):],
            "RepoTags": [args.name],
            "Layers": ["blobs/sha256/" + sha(layer)[len("sha256:"):]],
        }
    ]
    outer = [
        ("oci-layout", 0o644, canonical({"imageLayoutVersion": "1.0.0"})),
        ("index.json", 0o644, canonical(index)),
        ("manifest.json", 0o644, canonical(docker_manifest)),
        ("blobs/", 0o755, None),
        ("blobs/sha256/", 0o755, None),
    ] + [("blobs/sha256/" + h, 0o644, b) for h, b in blobs.items()]
    # Unique, so two builds writing the same archive never interleave; the rename is atomic.
    tmp = f"{args.out}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(tar_bytes(outer, mtime))
    os.replace(tmp, args.out)
    print(f"{args.name} {sha(manifest_blob)} layer {len(layer)} bytes", file=sys.stderr)


def check(path):
    """Verifies an archive: layout version, every blob's digest and size, config diff_ids."""
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}

    def blob(desc):
        data = members["blobs/sha256/" + desc["digest"].split(":", 1)[1]]
        assert sha(data) == desc["digest"], f"digest mismatch for {desc['digest']}"
        assert len(data) == desc["size"], f"size mismatch for {desc['digest']}"
        return data

    assert json.loads(members["oci-layout"])["imageLayoutVersion"] == "1.0.0"
    index = json.loads(members["index.json"])
    assert index["schemaVersion"] == 2 and index["mediaType"] == INDEX
    for desc in index["manifests"]:
        assert desc["mediaType"] == MANIFEST
        name = desc["annotations"][REF_NAME]
        assert desc["annotations"][CONTAINERD_NAME] == name
        manifest = json.loads(blob(desc))
        config = json.loads(blob(manifest["config"]))
        diff_ids = [sha(gzip.decompress(blob(layer))) for layer in manifest["layers"]]
        assert diff_ids == config["rootfs"]["diff_ids"], "diff_ids do not match the layers"
        print(f"{path}: {name} {desc['digest']} ok")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", metavar="ARCHIVE", help="verify an archive instead")
    p.add_argument("--out", help="archive to write")
    p.add_argument("--name", help="full image reference, name:tag")
    p.add_argument("--file", action="append", default=[], metavar="DEST=SRC",
                   help="an executable to put at DEST in the image")
    p.add_argument("--passwd", action="store_true",
                   help="add images/rootfs/etc/{passwd,group} (root, nonroot 65532) and /tmp")
    p.add_argument("--entrypoint", action="append", default=[])
    p.add_argument("--cmd", action="append", default=[])
    p.add_argument("--user", default="65532:65532")
    p.add_argument("--port", action="append", default=[], metavar="PORT/PROTO")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--stop-signal")
    args = p.parse_args()
    if args.check:
        check(args.check)
    elif args.out and args.name and args.file and args.entrypoint:
        build(args)
    else:
        p.error("--out, --name, --file and --entrypoint are required (or --check ARCHIVE)")


if __name__ == "__main__":
    main()
