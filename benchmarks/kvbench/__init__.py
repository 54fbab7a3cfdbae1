"""kvbench: kvdispatch's benchmark and test harness, installed from ``benchmarks/kvbench`` by the
same ``pip install -e .`` as kvdispatch, and never imported by it.

| module | what |
| --- | --- |
| ``cli.py`` | ``kvdispatch check`` and ``kvdispatch bench`` (through the ``kvdispatch.commands`` entry points); ``python -m kvbench`` |
| ``info.py`` | ``kvdispatch info`` (same group); ``versions()`` and ``table()`` for every report |
| ``layouts.py`` | builders of every cache layout (``make_kv_cache``, ``make_mla_cache``), random slots, block tables, fills: shared by the tests, the check and the benchmark |
| ``compare.py`` | the one check against the reference: ``force_backend``, ``clone_views``, ``cache_mismatch`` (the fp8 rule), ``attention_mismatch`` |
| ``selfcheck.py`` | ``kvdispatch check``: each op on a device against the reference on CPU copies |
| ``suite.py``, ``cases.py``, ``runner.py``, ``report.py`` | ``kvdispatch bench``: the suite (cases, workloads, the checked-then-timed loop, tables / JSON / markdown / PNG) and ``--overhead-only`` |
| ``tune_write.py``, ``tune_attention.py`` | ``kvdispatch bench --tune write`` / ``--tune attention``: the launch-config sweeps behind the Triton config tables |
| ``timing.py`` | the one timing module: do_bench / host medians, CUDA-graph replay, copy bandwidth, matmul peak, host time per call |
| ``vendors/`` | the benchmarked implementations' interface (``Vendor``, ``Unsupported``), kvdispatch's backends as implementations, and the vendor adapters (FlagGems, vLLM, FlashInfer, flash-attn, IPEX, torch baselines) |
"""
