"""Starling: many people pretrain one language model together over the ordinary internet."""

__version__ = "0.1.0"
