"""The pipeline's stages: each one reads the run's config, calls the library (``supernet``, ``search``,
``retrain``) with plain arguments, and writes its files into the run folder. ``glora.pipeline`` runs them in
order; the CLI (``run_search.py``) sits above both.
"""
