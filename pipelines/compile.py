"""Compile the pipeline: KFP IR YAML, and Kubernetes ``Pipeline`` + ``PipelineVersion`` manifests.

The IR (``cycleprune_pipeline.yaml``) is what the KFP UI uploads and ``kfp.Client`` runs. The
manifests (``cycleprune_pipeline.k8s.yaml``) are for KFP's Kubernetes-native API mode
(``kubectl apply``, GitOps). The output is deterministic: the same code and image give the same
bytes (the compiler writes no timestamp; a test compiles twice and compares).
"""

import hashlib
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
    with tempfile.TemporaryDirectory() as tmp:
        ir = Path(tmp) / IR_FILE
        compiler.Compiler().compile(pipeline, str(ir))
        manifest_options = KubernetesManifestOptions(
            pipeline_name=PIPELINE_NAME,
            pipeline_version_name=version_name(image, ir.read_bytes()),
            include_pipeline_manifest=True,
        )
        manifests = Path(tmp) / MANIFEST_FILE
        compiler.Compiler().compile(
            pipeline,
            str(manifests),
            kubernetes_manifest_options=manifest_options,
            kubernetes_manifest_format=True,
        )
        return [
            storage.atomic_write_bytes(out / IR_FILE, ir.read_bytes()),
            storage.atomic_write_bytes(out / MANIFEST_FILE, manifests.read_bytes()),
        ]


def version_name(image: str, spec: bytes) -> str:
    """A Kubernetes-safe PipelineVersion name: the image tag and a digest of the pipeline spec.

    ``cycleprune-0-1-0-<8 hex>``: KFP refuses to change the spec of an existing PipelineVersion,
    so any change to the compiled pipeline (code, parameters, image) must come under a new name,
    or ``kubectl apply`` would fail on it.
    """
    tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else "latest"
    safe = "".join(c if c.isalnum() else "-" for c in tag.lower()).strip("-") or "latest"
    digest = hashlib.sha256(image.encode() + b"\0" + spec).hexdigest()[:8]
    return f"{f'{PIPELINE_NAME}-{safe}'[:54].rstrip('-')}-{digest}"
