"""Build of mxlamb: the operator library is compiled against the MXNet of the target environment.

``pip install .`` (or ``pip install -e .``) compiles ``src/operators`` with g++ into
``mxlamb/libmxlamb.so``, a plain shared library that ``mxlamb`` loads with
``mx.library.load``. Its headers and ``src/lib_api.cc`` come from an installed mxnet package,
and the library records that mxnet's version and refuses any other at load time.

mxlamb never installs MXNet (an ``mxnet`` requirement would replace ``mxnet-cu112``,
``mxnet-mkl`` or a 2.0 beta with the CPU ``mxnet``), so the build looks for the user's own,
without importing it, in this order:

1. an mxnet the build itself can import: ``pip install --no-build-isolation``,
   ``python -m build --no-isolation``, ``make``;
2. under pip's build isolation, which hides the target environment's packages: the mxnet of
   the interpreter pip installs into (``sys.executable``), run without pip's isolation paths;
3. none found: ``build_backend.py`` has the isolated build environment fetch
   ``MXLAMB_BUILD_MXNET`` (default ``mxnet==1.9.1``) for its headers only, and says so. This
   is what a plain ``python -m build`` does (its isolated environment cannot see yours).

The kernels are compiled once per instruction-set level (baseline x86-64, AVX2, AVX-512) and
chosen at run time, so a wheel built on one machine runs at full speed, or at all, on another.
The library needs no symbol version of glibc, libstdc++, libgcc or libgomp newer than
``libmxnet.so`` itself does (``src/operators/portability.*``) and exports only what MXNet and
mxlamb's ctypes layer call (a linker version script).

Environment variables:
  CXX                the C++ compiler (default g++)
  CXXFLAGS, LDFLAGS  added to every compile / to the link, before mxlamb's own flags (so
                     -O3, -ffp-contract=off and the per-level -m flags, on which exactness and
                     the run-time ISA choice rest, win over e.g. -march=native)
  MXLAMB_CXXFLAGS    extra flags for every file, after mxlamb's (e.g. -fsanitize=address)
  MXLAMB_BUILD_MXNET the requirement fetched into an isolated build that finds no mxnet
  MXLAMB_CUDA=1      also compile the CUDA kernels with nvcc (see src/operators/*.cu)
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

if sys.version_info[:2] < (3, 8) or sys.version_info[:2] >= (3, 12):
    # Said here, in the first build hook, rather than as an error of some dependency's build:
    # mxnet 1.9.1 and 2.0.0b1 import np.bool, which is gone from numpy 1.24, and numpy 1.23
    # has no build for Python 3.12.
    sys.exit("mxlamb needs Python 3.8-3.11, not %d.%d: MXNet 1.9.1 and 2.0.0b1 need numpy < 1.24, "
             "which has no Python 3.12 release. Create the environment with python3.11 (for "
             "example: python3.11 -m venv .venv)." % sys.version_info[:2])

from setuptools import Extension, setup  # noqa: E402
from setuptools.command.build_ext import build_ext  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OPERATOR_DIR = os.path.join("src", "operators")

# The compilers' flags (COMMON_FLAGS, ISA_FLAGS) and the CUDA kernels' nvcc build (MXLAMB_CUDA=1)
# live in native_build.py, which the GPU tests and benchmark import where this file cannot be
# imported (the GPU machine: Python 3.12, no MXNet).
sys.path.insert(0, HERE)
from native_build import COMMON_FLAGS, ISA_FLAGS, NVCC_ARCH, compile_cuda_library  # noqa: E402,F401
DEFAULT_BUILD_MXNET = "mxnet==1.9.1"

# Compiled once (not per ISA level). lamb_op_gpu.cc, the operators' GPU forwards, only into a
# build with the CUDA kernels (MXLAMB_CUDA=1).
PORTABLE_SOURCES = ["lamb_op.cc", "op_table.cc", "lamb_cpu.cc", "runtime.cc", "bench_probe.cc",
                    "portability.cc"]
GPU_SOURCES = ["lamb_op_gpu.cc"]

# Portability: libstdc++, libgcc and libgomp stay shared with MXNet (one C++ and one OpenMP
# runtime in the process), and the library asks them and glibc for nothing newer than
# libmxnet.so does (GLIBC_2.14, GLIBCXX_3.4.19, CXXABI_1.3.7, GOMP_1.0). portability.h pins
# the math functions' glibc versions; portability.cc (compiled once, with the ISA-independent
# sources) defines the newer runtime functions that GCC's headers call, from older ones; the
# pre-GCC-5 std::string ABI and no sized delete keep the rest old. None of this changes the
# arithmetic: the kernels' object code is byte for byte the same.
COMPAT_FLAGS = ["-include", os.path.join(OPERATOR_DIR, "portability.h"),
                "-D_GLIBCXX_USE_CXX11_ABI=0", "-fno-sized-deallocation"]



# Run in the target interpreter: where its mxnet package is, without importing it (importing
# mxnet 1.9.1 fails next to numpy >= 1.24, and takes seconds).
_LOCATE_MXNET = (
    "import importlib.util, json\n"
    "spec = importlib.util.find_spec('mxnet')\n"
    "print(json.dumps(list(spec.submodule_search_locations or []) if spec else []))\n")


def _mxnet_dirs_in(python):
    """The mxnet package directories that ``python`` (an interpreter path, run without pip's
    build-isolation variables) can import, or []."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    try:
        out = subprocess.run([python, "-c", _LOCATE_MXNET], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, universal_newlines=True, timeout=120,
                             check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return []


def _mxnet_at(package_dir, how):
    """Include path, lib_api.cc, version and version number of the mxnet package in
    ``package_dir`` (a wheel's layout, or a source checkout's python/mxnet), or None."""
    roots = [package_dir, os.path.join(package_dir, "..", "..")]  # wheel, then source tree
    include = next((os.path.join(r, "include") for r in roots
                    if os.path.exists(os.path.join(r, "include", "mxnet", "lib_api.h"))), None)
    lib_api = next((os.path.join(r, "src", "lib_api.cc") for r in roots
                    if os.path.exists(os.path.join(r, "src", "lib_api.cc"))), None)
    try:
        with open(os.path.join(package_dir, "libinfo.py")) as f:
            version = re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", f.read(), re.M).group(1)
    except (OSError, AttributeError):
        return None
    if include is None or lib_api is None:
        raise RuntimeError("mxnet %s at %s ships no include/mxnet/lib_api.h or src/lib_api.cc; "
                           "mxlamb needs mxnet >= 1.7" % (version, package_dir))
    # The leading digits of each part: '2.0.0beta1' -> 2, 0, 0 (as MXNet itself counts).
    major, minor, patch = (int(re.match(r"\d*", p).group() or 0)
                           for p in (version.split(".") + ["0", "0"])[:3])
    return {"include": os.path.normpath(include), "lib_api": os.path.normpath(lib_api),
            "version": version, "number": major * 10000 + minor * 100 + patch,
            "dir": os.path.normpath(package_dir), "how": how}


def find_mxnet():
    """The mxnet to build against (see the module docstring), or None."""
    import importlib.util

    spec = importlib.util.find_spec("mxnet")
    if spec is not None and spec.submodule_search_locations:
        found = _mxnet_at(list(spec.submodule_search_locations)[0], "importable by the build")
        if found:
            return found
    for package_dir in _mxnet_dirs_in(sys.executable):
        found = _mxnet_at(package_dir, "the target environment's (%s)" % sys.executable)
        if found:
            return found
    return None


def build_requirements():
    """Extra requirements of an isolated build: none where an mxnet is found, else the
    MXLAMB_BUILD_MXNET one (headers only; it is never installed for the user)."""
    if find_mxnet() is not None:
        return []
    requirement = os.environ.get("MXLAMB_BUILD_MXNET") or DEFAULT_BUILD_MXNET
    print("mxlamb: no MXNet in the target environment (or the build isolation hides it): "
          "building against %s fetched into the isolated build environment. Import will need "
          "that MXNet version (any distribution: mxnet, mxnet-cu112, ...). To build for your "
          "MXNet, install it first (and, where an isolation still hides it, build with pip "
          "install --no-build-isolation or python -m build --no-isolation)." % requirement,
          file=sys.stderr)
    return [requirement]


def mxnet_build_info(found=None):
    """Include path, lib_api.cc and version number (1.9.1 -> 10901) of the mxnet to build
    against (``found``, else find_mxnet()'s); a RuntimeError naming what to do where none is."""
    found = found or find_mxnet()
    if found is None:
        raise RuntimeError(
            "mxlamb compiles its operators against the MXNet of the environment it is installed "
            "into, and found none there. Install your MXNet first (e.g. pip install "
            "mxnet==1.9.1 'numpy<1.24', or mxnet-cu112), then mxlamb again.")
    return found["include"], found["lib_api"], found["number"]


def exported_symbols(include):
    """What the library exports: the entry points MXNet's library loader looks up
    (lib_api.h's MXLIB_*_STR names, ``initialize`` among them) and mxlamb's ctypes functions."""
    with open(os.path.join(include, "mxnet", "lib_api.h")) as f:
        names = re.findall(r'#define\s+MXLIB_\w+_STR\s+"(\w+)"', f.read())
    return sorted(set(names)) + ["mxlamb_*"]


def _version_script(path, include):
    with open(path, "w") as f:
        f.write("{\n  global:\n%s  local: *;\n};\n"
                % "".join("    %s;\n" % name for name in exported_symbols(include)))
    return path


def compile_operator_library(output, build_temp, cxx=None, extra_flags=(), mxnet=None,
                             cuda_library=None):
    """Compile every operator source against ``mxnet`` (a find_mxnet() result; default: the
    one find_mxnet() finds) and link ``output``; returns the output path. With
    ``cuda_library`` (a compile_cuda_library() output in the same directory as ``output``) the
    operators also get their GPU forwards, linked to it."""
    cxx = cxx or os.environ.get("CXX", "g++")
    extra = list(extra_flags) + shlex.split(os.environ.get("MXLAMB_CXXFLAGS", ""))
    sources = PORTABLE_SOURCES
    if cuda_library is not None:
        sources = PORTABLE_SOURCES + GPU_SOURCES
        extra += ["-DMXLAMB_WITH_CUDA", "-L" + os.path.dirname(os.path.abspath(cuda_library)),
                  "-l" + re.sub(r"^lib|\.so$", "", os.path.basename(cuda_library)),
                  "-Wl,-rpath,$ORIGIN"]
    include, lib_api, version = mxnet_build_info(mxnet)
    os.makedirs(build_temp, exist_ok=True)
    base = ([cxx] + shlex.split(os.environ.get("CXXFLAGS", "")) + COMMON_FLAGS
            + ["-I", include, "-I", OPERATOR_DIR, "-DMXLAMB_MXNET_VERSION=%d" % version]
            + COMPAT_FLAGS + extra)

    jobs = []  # (command, object file)
    for isa, flags in ISA_FLAGS.items():
        obj = os.path.join(build_temp, "lamb_kernels_%s.o" % isa)
        jobs.append((base + flags + ["-DMXLAMB_ISA=" + isa, "-c",
                                     os.path.join(OPERATOR_DIR, "lamb_kernels.cc"), "-o", obj], obj))
    for source in sources:
        obj = os.path.join(build_temp, source.replace(".cc", ".o"))
        jobs.append((base + ["-c", os.path.join(OPERATOR_DIR, source), "-o", obj], obj))
    obj = os.path.join(build_temp, "lib_api.o")
    jobs.append((base + ["-w", "-c", lib_api, "-o", obj], obj))

    def run(job):
        print(" ".join(job[0]))
        subprocess.check_call(job[0])
        return job[1]

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        objects = list(pool.map(run, jobs))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    script = _version_script(os.path.join(build_temp, "mxlamb.map"), include)
    link = ([cxx, "-shared", "-fopenmp"] + shlex.split(os.environ.get("LDFLAGS", ""))
            + ["-o", output] + objects + ["-Wl,--version-script=" + script] + extra)
    print(" ".join(link))
    subprocess.check_call(link)
    return output


class BuildOperators(build_ext):
    """Builds the operator library (a plain .so for mx.library.load, not a Python module)."""

    def get_ext_filename(self, ext_name):
        # "libmxlamb.so", without the Python ABI tag: the file is not a Python module.
        return ext_name.replace(".", os.sep) + ".so"

    def build_extension(self, ext):
        found = find_mxnet()
        if found is not None:
            print("mxlamb: building against mxnet %s at %s, %s"
                  % (found["version"], found["dir"], found["how"]))
        output = self.get_ext_fullpath(ext.name)
        cuda_lib = None
        if os.environ.get("MXLAMB_CUDA") == "1":
            # The kernels as their own library, and the MXNet operators' GPU forward linked to it.
            cuda_lib = compile_cuda_library(
                os.path.join(os.path.dirname(output), "libmxlamb_cuda.so"))
        compile_operator_library(output, self.build_temp, mxnet=found, cuda_library=cuda_lib)
        # pip builds a source directory in place (pip >= 21.3): the libraries also go into the
        # source tree's mxlamb/, so that running from the tree's root, where Python imports
        # ./mxlamb before the installed copy, finds them (the README's commands run from there).
        tree = os.path.join(HERE, "mxlamb")
        if (os.path.exists(os.path.join(tree, "__init__.py"))
                and os.path.abspath(os.path.dirname(output)) != os.path.abspath(tree)):
            for name in os.listdir(os.path.dirname(output)):
                if name.endswith(".so"):
                    # A new file renamed over the old one: a process that has the old one
                    # loaded keeps its copy.
                    shutil.copyfile(os.path.join(os.path.dirname(output), name),
                                    os.path.join(tree, name + ".tmp"))
                    os.replace(os.path.join(tree, name + ".tmp"), os.path.join(tree, name))


try:  # setuptools >= 70.1 has bdist_wheel; before, the wheel package did
    from setuptools.command.bdist_wheel import bdist_wheel as _bdist_wheel
except ImportError:
    import warnings

    with warnings.catch_warnings():  # wheel's "use setuptools' own" (not there yet)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            from wheel.bdist_wheel import bdist_wheel as _bdist_wheel
        except ImportError:
            _bdist_wheel = None

COMMANDS = {"build_ext": BuildOperators}
if _bdist_wheel is not None:
    class PlatformWheel(_bdist_wheel):
        """Tagged py3-none-<platform>: the library is not a Python extension, so one wheel
        serves every supported Python (it is built for one MXNet version, which it checks)."""

        def get_tag(self):
            return ("py3", "none") + tuple(super().get_tag()[2:])

    COMMANDS["bdist_wheel"] = PlatformWheel


if __name__ == "__main__":  # pip and setuptools run this file as __main__; tests import it
    setup(
        ext_modules=[Extension("mxlamb.libmxlamb", sources=[])],
        cmdclass=COMMANDS,
    )
