"""TeleChat2 on MindSpore.

Importing the package does not import MindSpore (the tokenizer, config and evaluation loaders work
without it); the model modules import it themselves.
"""
__version__ = "0.1.0"
