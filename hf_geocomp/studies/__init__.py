"""Studies: benchmarks and hypothesis studies that compose methods with evaluation.

The top layer of the package: a study may import any method and ``eval``; no method or
metric ever imports a study.
"""
