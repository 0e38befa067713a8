"""Benchmark harness (``arctic-jax bench``): workloads, drivers, statistics and reports.

- ``workload``: synthetic / JSONL requests and Poisson arrival times.
- ``runner``: in-process (AsyncEngine) and HTTP drivers, closed- and open-loop load.
- ``report``: percentiles, the JSON report, the table, the PNG plot, RESULTS.md sections.
- ``cli_commands``: the ``bench`` subcommand.

Nothing here imports httpx or matplotlib until the HTTP driver or a plot is used.
"""
