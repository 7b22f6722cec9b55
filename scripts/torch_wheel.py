"""Which torch build this machine's NVIDIA driver can run, from the ``nvidia-smi`` header.

run: nvidia-smi | python scripts/torch_wheel.py        (prints: <index url> <requirement>)
     python scripts/torch_wheel.py --nvidia-smi-file sample.txt --explain

``scripts/setup.sh`` calls it on machines where ``nvidia-smi`` works. The torch wheels on PyPI
(2.13.0 and later) are built against CUDA 13.0 and need a driver that reports CUDA 13.0 (R580 or
newer); on a CUDA 12.x driver they install, import, and then ``torch.cuda.is_available()`` is
False. The driver's header line ``CUDA Version: X.Y`` is the newest CUDA runtime it can run, so
the wheel index is the newest of download.pytorch.org's ``cuXYZ`` indexes the driver can run:

* CUDA >= 13.0 (driver >= 580): ``cu130``, ``torch==2.13.0``, the version the CPU path pins.
* CUDA 12.8-12.9 (driver 570-579): ``cu128``.
* CUDA 12.0-12.7 (driver 525-569): ``cu126``. CUDA 12 has minor-version compatibility (a 12.x
  build runs on any driver >= 525.60.13, PyTorch's wheels carry machine code for every GPU they
  support, so nothing is JIT-compiled by the older driver), and the ``cu121``/``cu124`` indexes
  stop at torch 2.5.1 / 2.6.0, older than transformers 5 wants for its features tested here.
* CUDA 11.8-11.x (drivers 520-524): ``cu118``, whose last torch is 2.7.1.
* older: no build of torch >= 2.6 (transformers 5's minimum) runs; update the driver.

Off ``cu130`` the requirement is a range, ``torch>=2.6,<=2.13.0``: pip takes the newest torch of
that index within it, 2.13.0 where the index has it. ``TORCH_INDEX_URL`` overrides the choice.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass

INDEX = "https://download.pytorch.org/whl/{tag}"
TORCH_VERSION = "2.13.0"  # the CPU path's pin (scripts/setup.sh); cu130 has the same release
TORCH_RANGE = f"torch>=2.6,<={TORCH_VERSION}"  # transformers 5 needs torch >= 2.6
# (lowest driver CUDA version, wheel tag), newest first: the first one the driver reaches wins.
WHEELS = [((13, 0), "cu130"), ((12, 8), "cu128"), ((12, 0), "cu126"), ((11, 8), "cu118")]


@dataclass(frozen=True)
class TorchChoice:
    """A torch build for one machine."""

    index_url: str
    requirement: str
    driver: str
    cuda: tuple[int, int]

    @property
    def tag(self) -> str:
        """The wheel index's tag, e.g. ``cu126``."""
        return self.index_url.rsplit("/", 1)[-1]


class DriverTooOldError(RuntimeError):
    """No torch build that lobass can use runs on this driver."""


def parse_nvidia_smi(text: str) -> tuple[str, tuple[int, int]]:
    """The driver version and the CUDA version it supports, from ``nvidia-smi``'s header.

    Raises:
        ValueError: when the text has no ``Driver Version`` / ``CUDA Version`` fields.

    """
    driver = re.search(r"Driver Version:\s*([0-9.]+)", text)
    cuda = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", text)
    if not driver or not cuda:
        raise ValueError("nvidia-smi printed no 'Driver Version: ... CUDA Version: X.Y' header; "
                         "is the NVIDIA driver loaded? Set TORCH_INDEX_URL to choose torch's "
                         "wheel index yourself")
    return driver[1], (int(cuda[1]), int(cuda[2]))


def choose_torch(nvidia_smi: str) -> TorchChoice:
    """The wheel index and requirement for the driver that ``nvidia_smi`` (its output) reports.

    Raises:
        ValueError: the text is not ``nvidia-smi`` output.
        DriverTooOldError: the driver runs no CUDA build of torch >= 2.6.

    """
    driver, cuda = parse_nvidia_smi(nvidia_smi)
    for lowest, tag in WHEELS:
        if cuda >= lowest:
            requirement = f"torch=={TORCH_VERSION}" if tag == "cu130" else TORCH_RANGE
            return TorchChoice(INDEX.format(tag=tag), requirement, driver, cuda)
    raise DriverTooOldError(
        f"NVIDIA driver {driver} supports CUDA {cuda[0]}.{cuda[1]}; lobass needs torch >= 2.6, "
        "whose oldest CUDA build (cu118) needs CUDA 11.8 (driver >= 520). Update the driver "
        "(>= 580 runs the default CUDA 13 wheels).")


def main(argv: list[str] | None = None) -> int:
    """Print ``<index url> <requirement>`` for ``nvidia-smi``'s output on stdin (or a file)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nvidia-smi-file", help="read nvidia-smi's output from this file")
    parser.add_argument("--explain", action="store_true", help="say why, on stderr")
    args = parser.parse_args(argv)
    if args.nvidia_smi_file:
        with open(args.nvidia_smi_file, encoding="utf-8") as handle:
            text = handle.read()
    else:
        text = sys.stdin.read()
    try:
        choice = choose_torch(text)
    except (ValueError, DriverTooOldError) as err:
        print(f"torch_wheel: {err}", file=sys.stderr)
        return 1
    if args.explain:
        print(f"torch_wheel: driver {choice.driver} runs CUDA {choice.cuda[0]}.{choice.cuda[1]}: "
              f"{choice.requirement} from {choice.index_url}", file=sys.stderr)
    print(choice.index_url, choice.requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main())
