"""llama.cpp's command-line tools for the GGUF benchmarks, built from the vendored sources of llama-cpp-python.

    python benchmarks/_llama_tools.py            # or `make llama-tools`: build once (~25-40 min on 2 cores)
    python benchmarks/_llama_tools.py --jobs 1   # beside other work

Not a benchmark itself (the leading underscore keeps it out of `make bench`). The sources are the sdist of the
llama-cpp-python release installed in the venv (the one the engine tests use), fetched with pip's own client
(``pip download --no-binary :all:``) and unpacked under ``benchmarks/.llama-tools/src``; nothing is downloaded as
a binary. ``LLAMA_CPP_SRC=/path/to/llama.cpp`` uses a source tree already on disk instead. The build goes to
``benchmarks/.llama-tools/build`` (git-ignored) with this CPU's features (`cpu_cmake_args`, which
`make gguf-engine` uses too): no native build and AMX off, since these machines list AMX but fault on its
instructions (a native build dies with SIGILL on any quantized model), and AVX512 only where the CPU has it.
The same sources give ``convert_hf_to_gguf.py`` and its gguf-py, which the ladder uses for the float files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent / ".llama-tools"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")
DEFAULT_VERSION = "0.3.36"  # the release the project's engine tests were checked against
# ggml's x86 switches and the /proc/cpuinfo flag each needs. AMX stays off: these machines list it but fault on it.
CPU_FEATURES = {
    "AVX": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "AVX512": "avx512f", "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16",
}  # fmt: skip


def cpu_cmake_args(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """ggml's CPU switches for THIS machine: no native build (it enables the faulting AMX), each x86 feature on
    exactly when the CPU lists it (a build with AVX512 dies with SIGILL on an AVX2-only machine)."""
    try:
        with open(cpuinfo) as handle:
            flags = set(next((line for line in handle if line.startswith("flags")), "").split())
    except OSError:
        flags = set()
    switches = [f"-DGGML_{name}={'ON' if flag in flags else 'OFF'}" for name, flag in CPU_FEATURES.items()]
    return ["-DGGML_NATIVE=OFF", *switches, "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


CMAKE_FLAGS = [
    *("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"),
    *cpu_cmake_args(),
]


def version() -> str:
    """The installed llama-cpp-python's version (the engine tests' llama.cpp), else the checked default."""
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return DEFAULT_VERSION


def source_dir() -> Path:
    """llama.cpp's source tree: ``$LLAMA_CPP_SRC``, else the vendored copy in llama-cpp-python's sdist (fetched
    and unpacked on first use)."""
    if os.environ.get("LLAMA_CPP_SRC"):
        return Path(os.environ["LLAMA_CPP_SRC"])
    tree = HERE / "src" / f"llama_cpp_python-{version()}" / "vendor" / "llama.cpp"
    if not (tree / "CMakeLists.txt").is_file():
        _fetch_sdist(tree.parents[2])
    return tree


def _fetch_sdist(into: Path) -> None:
    """``pip download`` the sdist (no wheels, no dependencies) and unpack it; the archive is not kept."""
    into.mkdir(parents=True, exist_ok=True)
    spec = f"llama-cpp-python=={version()}"
    print(f"llama.cpp sources: pip download {spec} (sdist) into {into}", flush=True)
    with tempfile.TemporaryDirectory(dir=into) as tmp:
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp, spec]
        subprocess.run(pip, check=True)
        (archive,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")


def build_dir() -> Path:
    return HERE / "build"


def tool(name: str) -> Path:
    return build_dir() / "bin" / name


def ensure(jobs: int = 2) -> dict[str, Path]:
    """``{tool: path}``, building what is missing first (cmake at ``nice -n 10``, ``jobs`` parallel compiles)."""
    if not all(tool(name).is_file() for name in TOOLS):
        build(jobs)
    return {name: tool(name) for name in TOOLS}


def build(jobs: int = 2) -> None:
    if shutil.which("cmake") is None:
        raise RuntimeError("building llama.cpp's tools needs cmake and a C++ compiler (apt-get install cmake g++)")
    src, out = source_dir(), build_dir()
    print(f"building {', '.join(TOOLS)} from {src} into {out} (-j{jobs}; 25-40 min on 2 cores) ...", flush=True)
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    subprocess.run([*nice, "cmake", "-S", str(src), "-B", str(out), *CMAKE_FLAGS], check=True)
    target = ["--target", *TOOLS]
    subprocess.run([*nice, "cmake", "--build", str(out), "--config", "Release", f"-j{jobs}", *target], check=True)


def converter() -> Path:
    """The vendored ``convert_hf_to_gguf.py`` (it puts its own gguf-py first on ``sys.path``)."""
    return source_dir() / "convert_hf_to_gguf.py"


def convert(folder: str | Path, out: str | Path, outtype: str = "f32", vocab_from: str | Path | None = None) -> Path:
    """``convert_hf_to_gguf.py FOLDER --outtype OUTTYPE --outfile OUT`` in a subprocess (its own gguf-py).

    ``vocab_from``: a GGUF file whose ``tokenizer.*`` fields replace the converter's vocabulary step. SmolLM2's
    float folder needs it: its tokenizer came out of a GGUF, and the converter makes an SPM "llama" vocabulary
    without merges of it (and needs sentencepiece to try), which crashes llama.cpp's tokenizer; the source GGUF's
    fields (gpt2 BPE, pre "smollm", merges, chat template) are the right ones, and QuEPT's export copies them too.
    """
    out = Path(out)
    staging = out.with_name(f".{out.name}.tmp")
    argv = [str(folder), "--outtype", outtype, "--outfile", str(staging)]
    vocab = [] if vocab_from is None else ["--vocab-from", str(vocab_from)]
    command = [sys.executable, __file__, *vocab, "--convert", *argv]  # --convert takes the rest of the line
    subprocess.run(command, check=True)
    os.replace(staging, out)
    return out


def _run_converter(argv: list[str], vocab_from: str | None) -> None:
    """In this process: the vendored converter's ``main`` (optionally with the vocabulary copied from a GGUF)."""
    sys.path.insert(0, str(source_dir()))
    import convert_hf_to_gguf
    import gguf  # the converter's own gguf-py, first on sys.path now
    from conversion.llama import LlamaModel

    def copy_vocab(self) -> None:
        for key, field in gguf.GGUFReader(vocab_from).fields.items():
            if key.startswith("tokenizer."):
                kind = field.types[0]
                sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
                self.gguf_writer.add_key_value(key, field.contents(), kind, sub_type=sub)

    if vocab_from is not None:
        LlamaModel.set_vocab = copy_vocab
    sys.argv = ["convert_hf_to_gguf.py", *argv]
    convert_hf_to_gguf.main()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2; 1 beside other work)")
    parser.add_argument("--convert", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # used by convert()
    parser.add_argument("--vocab-from", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cmake-args", action="store_true", help="print this CPU's ggml switches (make gguf-engine)")
    args = parser.parse_args()
    if args.cmake_args:
        return print(" ".join(cpu_cmake_args()))
    if args.convert is not None:
        return _run_converter(args.convert, args.vocab_from)
    for name, path in ensure(args.jobs).items():
        print(f"{name}: {path}")
    print(f"convert_hf_to_gguf.py: {converter()}")


if __name__ == "__main__":
    main()
