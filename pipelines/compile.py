"""Compile the pipeline: KFP IR YAML, and Kubernetes ``Pipeline`` + ``PipelineVersion`` manifests.

The IR (``cycleprune_pipeline.yaml``) is what the KFP UI uploads and ``kfp.Client`` runs. The
manifests (``cycleprune_pipeline.k8s.yaml``) are for KFP's Kubernetes-native API mode
(``kubectl apply``, GitOps). The output is deterministic: the same code and image give the same
bytes (the compiler writes no timestamp; a test compiles twice and compares).
"""

import tempfile
from pathlib import Path

from kfp import compiler
from kfp.compiler.compiler_utils import KubernetesManifestOptions

from components._base import DEFAULT_IMAGE
from cycleprune import storage
from pipelines.pipeline import PIPELINE_NAME, build_pipeline

IR_FILE = "cycleprune_pipeline.yaml"
MANIFEST_FILE = "cycleprune_pipeline.k8s.yaml"


def compile_pipeline(
    out_dir: str | Path, *, image: str = DEFAULT_IMAGE, gpus: int = 1
) -> list[Path]:
    """Write the IR YAML and the Kubernetes manifests into ``out_dir``.

    Args:
        out_dir: Output folder (created if needed; the two files are replaced atomically).
        image: Container image of every component.
        gpus: GPUs per GPU stage (find_lr, train, prune, evaluate); 0 = a CPU-only pipeline.

    Returns:
        The written paths: the IR YAML, then the manifests.

    Raises:
        ValueError: an empty ``image``, a negative ``gpus``.
    """
    if not image or not image.strip():
        raise ValueError(f"Argument `image` must name a container image. Received: {image!r}")
    out = Path(out_dir)
    pipeline = build_pipeline(image, gpus=gpus)
    manifest_options = KubernetesManifestOptions(
        pipeline_name=PIPELINE_NAME,
        pipeline_version_name=_version_name(image),
        include_pipeline_manifest=True,
    )
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, k8s in ((IR_FILE, False), (MANIFEST_FILE, True)):
            staged = Path(tmp) / name
            compiler.Compiler().compile(
                pipeline,
                str(staged),
                kubernetes_manifest_options=manifest_options if k8s else None,
                kubernetes_manifest_format=k8s,
            )
            written.append(storage.atomic_write_bytes(out / name, staged.read_bytes()))
    return written


def _version_name(image: str) -> str:
    """A Kubernetes-safe PipelineVersion name from the image tag: cycleprune-0-1-0."""
    tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else "latest"
    safe = "".join(c if c.isalnum() else "-" for c in tag.lower()).strip("-")
    return f"{PIPELINE_NAME}-{safe or 'latest'}"[:63].rstrip("-")
