"""med3dvlm: train and evaluate Med3DVLM-style 3D medical vision-language models."""

__version__ = "0.1.0"
