"""Models: the timm backbone + head network, its Lightning module, and image data for it."""
