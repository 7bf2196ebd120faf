"""Datasets (tensorflow-datasets), pure image transforms, and the input pipeline."""
