"""The GPU image's own packages, stood in for on this machine (scripts/gpu_image.txt).

run: python scripts/gpu_image.py stubs scripts/gpu_image.txt OUT_DIR [--installed]
     python scripts/gpu_image.py site scripts/gpu_image.txt OUT_DIR

``stubs``: pip resolves the check's requirements for another machine (Python 3.12, the image's
packages). With ``--target`` or ``download`` pip sees no installed packages, so without stubs it
would want torch, transformers and the rest of the image in the wheelhouse (GBs). Each image
package becomes ``OUT_DIR/name-version+image-py3-none-any.whl`` (metadata only, no dependencies,
no files) and a line ``name==version+image`` of ``OUT_DIR/constraints.txt``: with ``-c`` that
file pip takes the image's version as given (the local label ``+image`` keeps it from fetching
PyPI's real wheel of the same version) and fetches only what the image lacks. A package whose
image version was never read (a bare name in the list) gets this interpreter's installed version;
one not installed here is left out (nothing lobass needs depends on it). ``--installed`` takes
every version from this interpreter: the stand-in for the rehearsal's local install.

``site``: a folder of links to this interpreter's installed distributions of the image's
packages and their dependencies, never those of ``--exclude-wheels``. On ``PYTHONPATH`` over a
bare interpreter of the same version it stands for the GPU image here: torch and the rest are
there, hydra, omegaconf and lm-eval are not.

Standard library only (``site`` also uses pip's ``packaging``); the stubs never leave this
machine.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import re
import sys
import zipfile
from pathlib import Path


def read_image_list(path: Path) -> list[tuple[str, str | None]]:
    """``(name, version or None)`` of every line ``name==version`` or ``name`` (``#``: comment).

    Raises:
        ValueError: a line that is neither, naming the file and line.

    """
    pins: list[tuple[str, str | None]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:==([0-9][A-Za-z0-9.!]*))?", text)
        if not match:
            raise ValueError(f"{path}:{number}: expected name or name==version, got {text!r}")
        pins.append((match[1], match[2]))
    return pins


def installed_version(name: str) -> str | None:
    """Installed version of ``name`` in this interpreter, without a local label, or None.

    None also for a ``.dist-info`` without metadata (a link left from a deleted environment, a
    half-written install): it names no installed version.
    """
    try:
        version: str | None = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    return version.split("+", 1)[0] if version else None


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def write_stub(out: Path, name: str, version: str) -> Path:
    """A valid, empty ``py3-none-any`` wheel of ``name`` at ``version+image`` in ``out``."""
    dist = re.sub(r"[-_.]+", "_", name).lower()
    info = f"{dist}-{version}+image.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}+image\n"
                            "Summary: stands for the GPU image's own package\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: lobass-gpu-image\n"
                         b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [_record_line(k, v) for k, v in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = out / f"{dist}-{version}+image-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for member, data in files.items():
            archive.writestr(member, data)
    return wheel


def write_stubs(pins: list[tuple[str, str | None]], out: Path, installed: bool) -> int:
    """Stub wheels and ``constraints.txt`` in ``out``; returns how many."""
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, read in pins:
        version = installed_version(name) if installed or read is None else read
        if version is None:
            continue
        write_stub(out, name, version)
        lines.append(f"{name}=={version}+image\n")
    (out / "constraints.txt").write_text("".join(lines))
    return len(lines)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _dependencies(dist: importlib.metadata.Distribution) -> list[str]:
    """Names of the installed requirements of ``dist`` that apply without extras."""
    from packaging.requirements import Requirement  # pip's own; the interpreter runs pip

    names = []
    for text in dist.requires or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            names.append(requirement.name)
    return names


def link_site(pins: list[tuple[str, str | None]], out: Path, exclude: set[str]) -> int:
    """Links in ``out`` to the installed files of the image's packages; returns how many dists.

    The packages' own installed dependencies come too (recursively): this interpreter's versions
    may need more than the image's do (a newer huggingface-hub, say). Names in ``exclude`` (what
    the wheelhouse brings) never do, so they can only come from the wheelhouse.
    """
    out.mkdir(parents=True, exist_ok=True)
    todo = [name for name, _ in pins]
    seen: set[str] = set()
    while todo:
        name = _canonical(todo.pop())
        if name in seen or name in exclude:
            continue
        seen.add(name)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        base = Path(str(dist.locate_file("")))
        # the top-level entries of its RECORD: packages, modules, the .dist-info (not ../bin)
        tops = {Path(str(f)).parts[0] for f in dist.files or []} - {".."}
        for top in tops:
            if (base / top).exists() and not (out / top).exists():
                (out / top).symlink_to(base / top)
        todo.extend(_dependencies(dist))
    return len(list(out.glob("*.dist-info")))


def main(argv: list[str] | None = None) -> int:
    """``stubs`` or ``site``, as the module docstring says."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["stubs", "site"])
    parser.add_argument("image_list", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--installed", action="store_true",
                        help="stubs: every version from this interpreter")
    parser.add_argument("--exclude-wheels", type=Path, default=None,
                        help="site: never link the packages of the wheels in this folder")
    args = parser.parse_args(argv)
    pins = read_image_list(args.image_list)
    if args.what == "stubs":
        print(f"{write_stubs(pins, args.out, args.installed)} image stubs in {args.out}")
    else:
        wheels = args.exclude_wheels.glob("*.whl") if args.exclude_wheels else []
        exclude = {_canonical(w.name.split("-", 1)[0]) for w in wheels}
        print(f"{link_site(pins, args.out, exclude)} installed packages linked in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
