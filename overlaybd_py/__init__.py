"""overlaybd-py: lazy container image loading with overlaybd block-device images."""

__version__ = "0.1.0"
