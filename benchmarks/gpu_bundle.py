"""What benchmarks/gpu_check.py needs on a GPU machine with no network, made here (`make gpu-bundle`).

    python benchmarks/gpu_bundle.py                  # .whl/ and .gpu-tokenizer/, both ignored
    python benchmarks/gpu_bundle.py --cuda 12        # bitsandbytes builds for CUDA 12.x

The GPU machine (one H200, CPython 3.12, torch 2.11+cu130, transformers 5.17) lacks
bitsandbytes, TRL and datasets.  Everything it gets travels with the working tree,
64 MiB at most, so:
  * the wheels are CPython GPU_PYTHON wheels of the versions this project pins
    (requirements.txt), transformers and peft included, so the GPU runs the code
    tested here and not the machine's older transformers;
  * the bitsandbytes wheel (43 MB) ships a library for every CUDA and ROCm release; only
    the CPU one and those of the CUDA major release --cuda names are kept (about 4 MB);
  * the smollm2-135m preset's tokenizer is copied without its 98 MB of weights (3.5 MB).
It ends by adding up what would travel: the repository's tracked files plus both folders.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

GPU_PYTHON = "3.12"
# Brought at the versions requirements.txt and benchmarks/requirements.txt pin.
PINNED = ("bitsandbytes", "transformers", "peft", "datasets", "trl")
# datasets' own dependencies that the GPU machine lacks, pinned nowhere else.
EXTRA = ["dill==0.4.1", "multiprocess==0.70.19"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
CARRY_LIMIT = 64 * 2**20
NATIVE = re.compile(r"libbitsandbytes_(?P<backend>[a-z]+)(?P<release>\d*)\.(so|dll|dylib)$")


def keeps(name: str, cuda_major: str) -> bool:
    """Whether a bitsandbytes wheel member stays: all but native libraries of other backends."""
    match = NATIVE.search(name)
    if not match:
        return True
    return match["backend"] == "cpu" or (match["backend"] == "cuda"
                                         and match["release"].startswith(cuda_major))


def record_line(name: str, data: bytes) -> str:
    """A wheel RECORD line: path, sha256 in urlsafe base64 without padding, size."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def trim_wheel(wheel: Path, cuda_major: str) -> tuple[int, int]:
    """Rewrite wheel without the native libraries of other backends; (bytes before, after).

    Its RECORD lists exactly the members kept, so pip installs it as any other wheel.
    """
    before = wheel.stat().st_size
    trimmed = wheel.with_suffix(".trimmed")
    with zipfile.ZipFile(wheel) as source, \
            zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as out:
        kept = [info for info in source.infolist() if keeps(info.filename, cuda_major)]
        record = next(info.filename for info in kept if info.filename.endswith(".dist-info/RECORD"))
        lines = []
        for info in kept:
            if info.filename == record:
                continue
            data = source.read(info)
            out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
            lines.append(record_line(info.filename, data))
        out.writestr(record, "\n".join(lines + [f"{record},,"]) + "\n")
    trimmed.replace(wheel)
    return before, wheel.stat().st_size


def wheels() -> list[str]:
    """NAME==VERSION for PINNED, as the project's requirement files pin them, and EXTRA."""
    pins = {}
    for path in (ROOT / "requirements.txt", ROOT / "benchmarks" / "requirements.txt"):
        for line in path.read_text().splitlines():
            match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line)
            if match:
                pins[match[1].lower()] = match[0]
    return [pins[name] for name in PINNED] + EXTRA


def download(dest: Path, python: str) -> None:
    """pip download of wheels() for CPython python on x86-64 Linux, without dependencies."""
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
                    *platforms, "--dest", str(dest), *wheels()], check=True)


def size(path: Path) -> int:
    """Bytes in a file or under a folder."""
    return path.stat().st_size if path.is_file() else sum(
        p.stat().st_size for p in path.rglob("*") if p.is_file())


def tracked_bytes() -> int:
    """Bytes of the repository's tracked files, as the working tree holds them."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    return sum((ROOT / n).stat().st_size for n in names if n and (ROOT / n).is_file())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl",
                        help="the wheel folder (default .whl in the repository)")
    parser.add_argument("--python", default=GPU_PYTHON, help="the GPU machine's Python "
                        "(default %(default)s)")
    parser.add_argument("--cuda", default="13", help="the CUDA major release of the GPU "
                        "machine's torch, whose bitsandbytes libraries are kept (default 13: "
                        "torch 2.11+cu130)")
    args = parser.parse_args(argv)
    import shapes

    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.glob("*.whl"):  # a bundle of other pins or another --cuda
        old.unlink()
    download(args.dest, args.python)
    for wheel in args.dest.glob("bitsandbytes-*.whl"):
        before, after = trim_wheel(wheel, args.cuda)
        print(f"{wheel.name}: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB "
              f"(CPU and CUDA {args.cuda}.x libraries kept)")
    tokenizer = shapes.bundle_tokenizer()
    parts = {"tracked files": tracked_bytes(), str(args.dest.name): size(args.dest),
             str(tokenizer.name): size(tokenizer)}
    total = sum(parts.values())
    print(", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in parts.items())
          + f": {total / 2**20:.1f} MiB of the {CARRY_LIMIT // 2**20} MiB that may travel")
    if total > CARRY_LIMIT:
        print("too much to travel: carry fewer wheels", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
