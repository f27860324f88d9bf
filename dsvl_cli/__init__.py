"""dsvl: train vision-language chat models on multi-image, multi-round conversations."""

__version__ = "0.1.0"
