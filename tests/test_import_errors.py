"""What ``import mxlamb`` says when it cannot work, and the one command it names.

Regressions (issue 13): with numpy >= 1.24 the user saw MXNet's bare "module 'numpy' has no
attribute 'bool'"; the rebuild hint was ``pip install --no-build-isolation --force-reinstall .``,
which did not help from an installed copy and reinstalled mxnet, numpy and requests.
(tests/test_packaging.py runs the commands themselves.)
"""
import os
import subprocess
import sys

import pytest

import mxlamb
from mxlamb import _library

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(mxlamb.__file__)))


def import_fails(tmp_path, prelude):
    code = prelude + "\nimport mxlamb\n"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert proc.returncode != 0
    return proc.stderr.strip().splitlines()[-1]


def test_without_mxnet_it_says_mxlamb_leaves_mxnet_to_you(tmp_path):
    last = import_fails(tmp_path, "import sys; sys.modules['mxnet'] = None")
    assert last.startswith("ImportError: mxlamb needs Apache MXNet, which it does not install")
    assert "pip install mxnet==1.9.1 'numpy<1.24'" in last


def test_with_a_numpy_mxnet_cannot_import_it_names_the_numpy_needed(tmp_path):
    # An mxnet that fails as mxnet 1.9.1 does next to numpy 1.24 or newer.
    (tmp_path / "mxnet").mkdir()
    (tmp_path / "mxnet" / "__init__.py").write_text(
        "raise AttributeError(\"module 'numpy' has no attribute 'bool'.\\n(deprecation note)\")")
    last = import_fails(tmp_path, "")
    assert last.startswith("ImportError: MXNet cannot be imported with numpy ")
    assert "(module 'numpy' has no attribute 'bool'.)" in last
    assert last.endswith("pip install 'numpy<1.24'")


@pytest.mark.parametrize("record, tree, expected", [
    # A source tree (a clone, an unpacked sdist): built in place by installing it.
    ({"url": "file:///wheels/mxlamb-9.9-py3-none-linux_x86_64.whl", "archive_info": {}},
     "/src/mxlamb", "--force-reinstall /src/mxlamb"),
    # ... editable where the installed mxlamb is this tree, editable.
    ({"url": "file:///src/mxlamb", "dir_info": {"editable": True}}, "/src/mxlamb",
     "--force-reinstall -e /src/mxlamb"),
    # Installed from a directory or an sdist: that again.
    ({"url": "file:///src/my%20mxlamb", "dir_info": {}}, None,
     "--force-reinstall '/src/my mxlamb'"),
    ({"url": "file:///dl/mxlamb-9.9.tar.gz", "archive_info": {}}, None,
     "--force-reinstall --no-cache-dir /dl/mxlamb-9.9.tar.gz"),
    # From an index (or a wheel with no sdist beside it): the index's sdist, built here.
    ({}, None, "--force-reinstall --no-cache-dir --no-binary mxlamb mxlamb==9.9"),
    ({"url": "file:///nowhere/mxlamb-9.9-py3-none-linux_x86_64.whl", "archive_info": {}},
     None, "--force-reinstall --no-cache-dir --no-binary mxlamb mxlamb==9.9"),
])
def test_the_rebuild_command_fits_where_mxlamb_came_from(monkeypatch, record, tree, expected):
    monkeypatch.setattr(_library, "_install_record", lambda: record)
    monkeypatch.setattr(_library, "_source_tree", lambda: tree)
    monkeypatch.setattr(mxlamb, "__version__", "9.9")
    monkeypatch.setattr(sys, "executable", "/env/bin/python")
    assert _library.rebuild_command() == "/env/bin/python -m pip install --no-deps " + expected


def test_a_wheel_built_for_another_mxnet_points_at_the_sdist_beside_it(monkeypatch, tmp_path):
    (tmp_path / "mxlamb-9.9.tar.gz").write_bytes(b"")
    wheel = tmp_path / "mxlamb-9.9-py3-none-linux_x86_64.whl"
    monkeypatch.setattr(_library, "_install_record",
                        lambda: {"url": "file://" + str(wheel), "archive_info": {}})
    monkeypatch.setattr(_library, "_source_tree", lambda: None)
    monkeypatch.setattr(mxlamb, "__version__", "9.9")
    assert _library.rebuild_command().endswith(
        "--force-reinstall --no-cache-dir " + str(tmp_path / "mxlamb-9.9.tar.gz"))
