"""widesparse: MLP-Mixer as a wide and sparse MLP (Hayase & Karakida, ICML 2024)."""

__version__ = "0.1.0"
