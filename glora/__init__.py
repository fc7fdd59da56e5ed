"""glora-search's own namespace: the ground layer (``glora.core``: config, files, training loop), the
data (``glora.data``), the stages that turn a run's config into calls of the library (``glora.stages``)
and their orchestration (``glora.pipeline``, ``glora.suite``, ``glora.preflight``)."""
