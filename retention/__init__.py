"""retention: how well does knowledge edited into a language model survive fine-tuning?"""

__version__ = "0.1.0"
