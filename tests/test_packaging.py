"""mxlamb as a user and a packager get it: ``python -m build`` (an sdist, then a wheel from
it), installed into fresh virtualenvs that already hold an MXNet, used from outside the
source tree (``make test-packaging``, part of ``make test``; about two minutes).

Regressions (issue 13): the sdist lacked src/operators and could not be installed; ``pip
install`` replaced the user's mxnet 2.0.0b1 by 1.9.1; run from the source tree's root after
``pip install .``, Python imported ./mxlamb without its library, and the error suggested a
command that did not help.

One wheel build and two source builds: the wheel (against mxnet 1.9.1, fetched into the
isolated build, as a plain ``python -m build`` does), an unpacked sdist built in place by
the command its import error names (mxnet 1.9.1), and the sdist built in a virtualenv that
holds mxnet 2.0.0b1, by the command the 1.9.1 wheel's import error names there.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import mxlamb

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SMOKE = os.path.join(HERE, "smoke_step.py")
VERSION = mxlamb.__version__

pytestmark = pytest.mark.skipif(
    os.environ.get("MXLAMB_PACKAGING_TESTS") != "1",
    reason="builds and installs the package into new virtualenvs (about two minutes): "
           "make test-packaging, part of make test, runs it")


def run(argv, cwd=None, check=True, **env):
    """Runs a command with a clean environment: no PYTHONPATH or MXLAMB_* of the test run."""
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
                   and not k.startswith("MXLAMB_")}
    environment.update(env)
    proc = subprocess.run(argv, cwd=cwd, env=environment, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=600)
    if check:
        assert proc.returncode == 0, "%s failed (%d):\n%s\n%s" % (
            " ".join(argv), proc.returncode, proc.stdout[-3000:], proc.stderr[-5000:])
    return proc


def make_venv(path, *requirements):
    run([sys.executable, "-m", "venv", path])
    python = os.path.join(path, "bin", "python")
    run([python, "-m", "pip", "install", "-q"] + list(requirements))
    return python


def installed(python):
    """{distribution name: version} of a virtualenv."""
    out = run([python, "-m", "pip", "list", "--format=json"]).stdout
    return {d["name"].lower(): d["version"] for d in json.loads(out)}


def smoke(python, cwd, argv=None):
    """smoke_step.py's report: one Trainer step against the float64 reference."""
    proc = run([python] + (argv or [SMOKE]), cwd=cwd)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def command_in(message):
    """The command an mxlamb ImportError names (after 'with: ', to the end of the line)."""
    match = re.search(r"with: (.+)$", message.strip().splitlines()[-1])
    assert match, message
    return shlex.split(match.group(1))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    path = tmp_path_factory.mktemp("packaging")
    yield str(path)
    shutil.rmtree(str(path), ignore_errors=True)  # virtualenvs with MXNet: about 1 GB


@pytest.fixture(scope="module")
def mxnet1(work):
    """A virtualenv holding mxnet 1.9.1 (and build, and tqdm for the examples)."""
    return make_venv(os.path.join(work, "mxnet1"), "mxnet==1.9.1", "numpy<1.24", "build",
                     "tqdm")


@pytest.fixture(scope="module")
def dist(work, mxnet1):
    """``python -m build``: the sdist, then the wheel built from it (isolated)."""
    out = os.path.join(work, "dist")
    run([mxnet1, "-m", "build", "--outdir", out, ROOT])
    sdist = os.path.join(out, "mxlamb-%s.tar.gz" % VERSION)
    wheels = [os.path.join(out, f) for f in os.listdir(out) if f.endswith(".whl")]
    assert os.path.exists(sdist) and len(wheels) == 1, os.listdir(out)
    return sdist, wheels[0]


def test_the_sdist_carries_its_build_and_tests_and_the_wheel_its_metadata(dist):
    sdist, wheel = dist
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {"setup.py", "setup.cfg", "pyproject.toml", "build_backend.py", "native_build.py",
              "MANIFEST.in",
              "LICENSE", "CHANGELOG.md", "README.md", "Makefile", "pytest.ini",
              "requirements.txt", "requirements-mxnet2.txt", "tests/conftest.py",
              "tests/reference.py", "tests/dist_job.py", "tests/smoke_step.py",
              "examples/train_distributed.py", "mxlamb/__init__.py"}
    needed |= {"src/operators/" + f for f in os.listdir(os.path.join(ROOT, "src", "operators"))}
    assert needed <= names, sorted(needed - names)
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]

    assert os.path.basename(wheel) == "mxlamb-%s-py3-none-linux_x86_64.whl" % VERSION
    with zipfile.ZipFile(wheel) as whl:
        files = whl.namelist()
        metadata = whl.read("mxlamb-%s.dist-info/METADATA" % VERSION).decode()
    assert "mxlamb/libmxlamb.so" in files
    assert [f for f in files if f.endswith("/LICENSE")], files
    assert "Version: %s\n" % VERSION in metadata
    requires = re.findall(r"^Requires-Dist: ([^;\n]+)$", metadata, re.M)
    assert requires == ["numpy<1.24,>=1.16"], requires  # never mxnet (extras aside)
    assert "Requires-Python: <3.12,>=3.8" in metadata
    for classifier in ("License :: OSI Approved :: Apache Software License",
                       "Programming Language :: Python :: 3.11"):
        assert "Classifier: " + classifier in metadata
    assert "# Changelog" in metadata and "## %s" % VERSION in metadata


def test_the_wheel_installs_beside_mxnet_1_9_1_and_trains_from_outside_the_tree(
        work, mxnet1, dist):
    before = installed(mxnet1)
    run([mxnet1, "-m", "pip", "install", "-q", dist[1]])
    after = installed(mxnet1)
    assert after.pop("mxlamb") == VERSION
    assert after == before  # mxnet 1.9.1 and numpy as they were
    report = smoke(mxnet1, cwd=work)
    assert report["mxlamb_file"].startswith(os.path.join(work, "mxnet1", "lib"))
    assert report["mxnet"] == "1.9.1" and report["optimizer"] == "mxlamb.lamb"


def test_an_unbuilt_source_tree_names_the_command_that_builds_it_and_that_works(
        work, mxnet1, dist):
    """From the root of a source tree (an unpacked sdist, as a clone), Python imports the tree's
    mxlamb. Unbuilt, its ImportError names one command; after it, the tree works from its root,
    the README's launcher command included."""
    run([mxnet1, "-m", "pip", "install", "-q", dist[1]])  # an installed mxlamb beside it
    with tarfile.open(dist[0]) as tar:
        tar.extractall(work)
    tree = os.path.join(work, "mxlamb-%s" % VERSION)
    failed = run([mxnet1, "-c", "import mxlamb"], cwd=tree, check=False)
    assert failed.returncode != 0 and "source tree" in failed.stderr, failed.stderr
    command = command_in(failed.stderr)
    assert command[:3] == [mxnet1, "-m", "pip"] and command[-1] == tree, command
    run(command, cwd=tree)
    assert os.path.exists(os.path.join(tree, "mxlamb", "libmxlamb.so"))
    # From the root: '' (the tree) first on sys.path, as for python -m / -c there.
    report = smoke(mxnet1, cwd=tree, argv=["-c", "import sys; sys.path[1:1] = ['tests']; "
                                                 "import smoke_step; sys.exit(smoke_step.main())"])
    assert report["mxlamb_file"] == os.path.join(tree, "mxlamb", "__init__.py")
    proc = run([mxnet1, "-m", "mxlamb.launch", "--workers", "2", "--servers", "1", "--",
                mxnet1, "examples/train_distributed.py", "--epochs", "2"], cwd=tree)
    assert "test accuracy" in proc.stdout, proc.stdout


def test_mxnet_2_stays_and_the_sdist_builds_against_it(work, dist):
    """The wheel (built for 1.9.1) installed beside mxnet 2.0.0b1 leaves it there and says, on
    import, the one command that rebuilds: the sdist beside the wheel, built against 2.0.0b1."""
    python = make_venv(os.path.join(work, "mxnet2"), "mxnet==2.0.0b1", "numpy<1.24")
    before = installed(python)
    run([python, "-m", "pip", "install", "-q", dist[1]])
    failed = run([python, "-c", "import mxlamb"], cwd=work, check=False)
    assert "built for mxnet 10901 but mxnet 2.0.0beta1 (20000)" in failed.stderr, failed.stderr
    command = command_in(failed.stderr)
    assert command[-1] == dist[0], command
    run(command, cwd=work)
    after = installed(python)
    assert after.pop("mxlamb") == VERSION
    assert after == before and after["mxnet"] == "2.0.0b1"  # mxnet and numpy as they were
    report = smoke(python, cwd=work)
    assert report["mxnet"] == "2.0.0beta1"  # as mxnet 2.0.0b1 spells itself
    assert report["mxlamb_file"].startswith(os.path.join(work, "mxnet2", "lib"))
