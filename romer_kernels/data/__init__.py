"""Text the package evaluates and trains on: the bundled Wikipedia corpus and loaders for other text
(``corpus``). A leaf of the import graph: model training and evaluation both read from here."""
from romer_kernels.data.corpus import SPLITS, load_corpus, load_text, load_tokens

__all__ = ["SPLITS", "load_corpus", "load_text", "load_tokens"]
