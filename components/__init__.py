"""Kubeflow Pipelines components: one lightweight Python component per stage.

Each component is a thin adapter: artifact paths in, one ``cycleprune`` call, metrics and
visualizations out. The bodies import ``cycleprune`` inside the function (they run in the project
image, or in this virtualenv under ``kfp.local``). Layers: ``cycleprune`` <- ``components`` <-
``pipelines``; nothing here imports ``pipelines``.

This file imports nothing: inside a running component ``kfp.dsl`` is the slim runtime (no
``dsl.component``), and a body that imports ``components.parameters`` must not pull in the
component definitions. Import each component from its module (``components.train``).
"""
