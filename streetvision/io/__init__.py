"""Crash-safe artifact IO: atomic writes, manifests, and the object store."""
