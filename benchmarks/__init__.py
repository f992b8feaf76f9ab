"""Speed and memory measurements of lightning-mim next to MONAI and TorchIO (``make bench``).

Run everything with ``python -m benchmarks.run_all`` (``--quick`` for a fast check); results go to
``benchmarks/results/latest.{json,md}``. Each measurement runs in a fresh child process (see
:func:`benchmarks.common.run_isolated`) so peak memory is that measurement's own, and the two sides
of every comparison run in the same invocation on the same inputs and cores.
"""
