"""Engine integrations: each module imports its engine lazily and is never imported by the core.

* ``kvdispatch.integrations.flash_attn``: flash-attn's own signatures (switch by import).
* ``kvdispatch.integrations.vllm``: a vLLM attention backend (entry point ``vllm.general_plugins``).
* ``kvdispatch.integrations.transformers``: the ``paged|kvdispatch`` attention of transformers'
  continuous batching.
* ``kvdispatch.integrations.sglang``: an SGLang attention backend.
"""
