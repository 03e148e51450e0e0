"""orpolab: preference-align small language models, sweep them with Hydra, export to GGUF, judge on the CPU.

One package per pipeline stage, each depending only on those before it:
``core`` -> ``train`` -> ``sweep`` -> ``export`` -> ``evaluate``; ``demo`` (tiny models, sample task)
is imported by nothing else.
"""

__version__ = "0.1.0"
