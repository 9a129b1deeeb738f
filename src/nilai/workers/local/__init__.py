"""The built-in engine: transformers on PyTorch behind OpenAI's chat API.

Importing this package does not import torch; the modules that need it import it themselves,
so the gateway never pays for it (install the ``local`` extra to use them).
"""
