"""On the CPU: answers from the GGUFs, Flow Judge verdicts, statistics, the report, and a chat command.

``python -m orpolab.evaluate <sweep>`` runs it by hand (see :mod:`orpolab.evaluate.pipeline`).
"""
