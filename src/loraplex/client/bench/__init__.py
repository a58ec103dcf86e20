"""Multi-tenant load generator for OpenAI-compatible servers (loraplex, vLLM).

``workload`` decides what each request asks (Zipf adapter popularity, tenants, prompts),
``runner`` sends them (closed loop or Poisson open loop) and times every streamed token,
``report`` turns the timings into the JSON report, ``plots`` into PNG charts, ``cli`` is
``loraplex bench``. Scenario scripts that start servers live in the repository's ``bench/``.
"""
