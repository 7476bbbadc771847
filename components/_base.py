"""What every cycleprune component shares: the project image and the decorator settings.

Components are lightweight Python components: KFP ships each function's source to the container
and runs it there. The image already holds TensorFlow, kfp and ``cycleprune`` itself, so nothing is
pip-installed at run time (``install_kfp_package=False``, no ``packages_to_install``), and every
component body imports what it needs inside the function.
"""

from __future__ import annotations

import functools

from kfp import dsl

import cycleprune

IMAGE_REPOSITORY = "ghcr.io/cycleprune/cycleprune"
# Pinned to the library version so a compiled pipeline always runs the code it was compiled from.
DEFAULT_IMAGE = f"{IMAGE_REPOSITORY}:{cycleprune.__version__}"

component = functools.partial(dsl.component, base_image=DEFAULT_IMAGE, install_kfp_package=False)
