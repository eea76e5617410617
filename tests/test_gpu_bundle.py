"""benchmarks/gpu_bundle.py: the pins it brings and the trimmed bitsandbytes wheel, which pip
must still install (a made-up wheel here; nothing is downloaded)."""

import subprocess
import sys
import zipfile

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_bundle  # noqa: E402

LIBS = ["cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm72", "xpu2025"]


def fake_wheel(folder):
    """A wheel shaped like bitsandbytes': Python code plus one native library per backend."""
    path = folder / "fakebnb-1.0-py3-none-any.whl"
    members = {"fakebnb/__init__.py": b"VERSION = '1.0'\n",
               **{f"fakebnb/libbitsandbytes_{lib}.so": lib.encode() * 100 for lib in LIBS},
               "fakebnb-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: fakebnb\n"
                                                 b"Version: 1.0\n",
               "fakebnb-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\n"
                                              b"Root-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [gpu_bundle.record_line(name, data) for name, data in members.items()]
    with zipfile.ZipFile(path, "w") as out:
        for name, data in members.items():
            out.writestr(name, data)
        out.writestr("fakebnb-1.0.dist-info/RECORD",
                     "\n".join(record + ["fakebnb-1.0.dist-info/RECORD,,"]) + "\n")
    return path


def test_only_the_cpu_and_the_named_cuda_release_libraries_stay(tmp_path):
    wheel = fake_wheel(tmp_path)
    before, after = gpu_bundle.trim_wheel(wheel, "13")
    assert after < before
    with zipfile.ZipFile(wheel) as trimmed:
        names = trimmed.namelist()
        record = trimmed.read("fakebnb-1.0.dist-info/RECORD").decode().splitlines()
        kept = [n for n in names if n.endswith(".so")]
        assert sorted(kept) == [f"fakebnb/libbitsandbytes_{lib}.so"
                                for lib in ("cpu", "cuda130", "cuda132")]
        # RECORD lists exactly the members, each with its true hash
        assert sorted(line.split(",")[0] for line in record) == sorted(names)
        for line in record[:-1]:
            name = line.split(",")[0]
            if name.endswith("RECORD"):
                continue
            assert line == gpu_bundle.record_line(name, trimmed.read(name))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                    "--no-compile", "--target", str(target), str(wheel)], check=True)
    assert sorted(p.name for p in (target / "fakebnb").glob("*.so")) == [
        "libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so"]


def test_cuda_12_keeps_its_own_builds():
    assert gpu_bundle.keeps("bitsandbytes/libbitsandbytes_cuda128.so", "12")
    assert not gpu_bundle.keeps("bitsandbytes/libbitsandbytes_cuda130.so", "12")
    assert not gpu_bundle.keeps("bitsandbytes/libbitsandbytes_rocm72.so", "12")
    assert gpu_bundle.keeps("bitsandbytes/functional.py", "12")


def test_the_bundle_brings_the_versions_the_project_pins():
    """The GPU runs the code tested here: transformers and peft at requirements.txt's pins."""
    pins = {line.split("==")[0].lower(): line.split()[0]
            for path in (ROOT / "requirements.txt", ROOT / "benchmarks" / "requirements.txt")
            for line in path.read_text().splitlines() if "==" in line and not line.startswith("#")}
    wheels = gpu_bundle.wheels()
    for name in ("transformers", "peft", "bitsandbytes", "datasets", "trl"):
        assert pins[name] in wheels
