"""glora-search's own namespace: the ground layer (``glora.core``: config, files, training loop), the
data (``glora.data``) and the orchestration of the stages (``glora.pipeline``, ``glora.suite``,
``glora.preflight``)."""
