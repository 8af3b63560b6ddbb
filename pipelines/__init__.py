"""The StreetVision Kubeflow pipeline and its compile / submit scripts."""
