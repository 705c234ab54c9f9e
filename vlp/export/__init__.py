"""Export adapters: a vlp checkpoint as an open_clip folder, a transformers ``CLIPModel`` folder or
one safetensors file (``vlp export``; docs/export.md).

Every file written is safetensors or JSON, and every file read is safetensors or
``torch.load(weights_only=True)``: nothing is unpickled that could run code.
"""

from vlp.export.errors import ExportError
from vlp.export.run import FORMATS, export_checkpoint, export_model
from vlp.export.safetensors_file import load as load_safetensors
from vlp.export.source import ExportSource, load_source

__all__ = [
    "FORMATS",
    "ExportError",
    "ExportSource",
    "export_checkpoint",
    "export_model",
    "load_safetensors",
    "load_source",
]
