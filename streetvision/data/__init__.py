"""Data: the dataset index contract, the demo data generator, image decoding and splits."""
