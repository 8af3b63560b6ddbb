"""Kubeflow Pipelines container components, one per StreetVision phase (logic-free: an image and a command)."""
