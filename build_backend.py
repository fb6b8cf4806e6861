"""mxlamb's PEP 517 build backend: setuptools', with one change.

The operators compile against an installed MXNet, which mxlamb never installs for the user
(see setup.py). Where an isolated build finds none (a plain ``python -m build``, whose
isolated environment cannot see yours), the build environment, and only it, gets
``MXLAMB_BUILD_MXNET`` (default ``mxnet==1.9.1``) for its headers.
"""
from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (the hooks not defined here)

import setup as _setup


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + _setup.build_requirements()


def get_requires_for_build_editable(config_settings=None):
    return (_setuptools.get_requires_for_build_editable(config_settings)
            + _setup.build_requirements())
