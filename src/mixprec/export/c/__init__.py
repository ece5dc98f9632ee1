"""C99 export for microcontrollers: a self-contained library (no malloc, one static arena) whose
integer arithmetic is the NumPy reference's, with FLASH and RAM exactly as the cost model counts.

>>> from mixprec.export.c import CExporter   # registered as format "c"
"""
from .exporter import CExporter, input_grid, quantize_codes
from .generate import CModel, generate

__all__ = ["CExporter", "CModel", "generate", "input_grid", "quantize_codes"]
