"""Shared helpers: configuration, errors, atomic file writes."""
