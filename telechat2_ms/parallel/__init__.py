"""Explicit (Megatron-style) parallelism for TeleChat2, testable on CPU under msrun.

comm (process groups, collectives, autograd regions; AllReduce emulation on CPU), dims (ParallelDims:
validation and rank <-> coordinates), layers (column/row/vocab-parallel cells, vocab-parallel cross
entropy), ring_attention (context parallel), pipeline (1F1B), data_parallel (gradient reduction),
parallelize (`parallelize_telechat2(model, dims)`), loading (sharded / full checkpoints), launcher (msrun
under a timeout). Importing this package does not import MindSpore; the modules do.
"""
