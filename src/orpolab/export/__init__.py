"""After a sweep: pick the winners, merge their adapters, convert and quantize with llama.cpp, verify.

``python -m orpolab.export <sweep>`` runs it by hand (see :mod:`orpolab.export.pipeline`).
"""
