"""The cycleprune Kubeflow pipeline: graph (:mod:`pipelines.pipeline`), compilation
(:mod:`pipelines.compile`) and local runs with kfp.local (:mod:`pipelines.local`).

Layers: ``cycleprune`` <- ``components`` <- ``pipelines``; the library never imports this package.
"""

from components._base import DEFAULT_IMAGE
from pipelines.compile import compile_pipeline
from pipelines.local import format_table, run_local
from pipelines.pipeline import DEFAULT_SOURCE, PIPELINE_NAME, build_pipeline

__all__ = [
    "DEFAULT_IMAGE",
    "DEFAULT_SOURCE",
    "PIPELINE_NAME",
    "build_pipeline",
    "compile_pipeline",
    "format_table",
    "run_local",
]
