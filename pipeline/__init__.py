"""Distributed batch feature extraction for whole-slide images on Ray."""

__version__ = "0.1.0"
