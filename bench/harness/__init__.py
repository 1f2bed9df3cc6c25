"""The benchmark harness: what every suite in ``bench/`` measures with, written once.

- ``checkout``: which fsmchat is measured (this one, or ``--fsmchat DIR`` for an A/B run);
- ``server``: one server process (start, wait for ``server.started`` or the port, read its
  events, SIGTERM, descriptor limit), ``procfs``: its CPU, memory and descriptors;
- ``frames``: the one frame format of timed messages, ``stats``: the latency histogram and its
  percentiles; ``loadgen``: the clients that send and check those frames;
- ``capacity``: what makes a step fail, and the rate search;
- ``counting`` and ``alternating``: clients that count bytes (plain or TLS), and one build in
  alternating configurations (``tls.py``, ``chat.py``, ``logs.py``);
- ``suite``: the options and the start every suite shares, ``report``: tables, and the dated
  JSON results that ``bench/summary.py`` turns into ``results/SUMMARY.md``.

Rules: a suite is a short script that says what it measures; how to measure is here. Nothing
here knows one suite's figures.
"""
