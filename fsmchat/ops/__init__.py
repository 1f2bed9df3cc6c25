"""What operators read: the status events and their catalogue (``events``), stdout as a
descriptor of the loop (``logstream``), the server's numbers (``stats``), and Prometheus metrics
(``metrics``) served over HTTP from the same loop (``metrics_http``, a ``net.http`` site)."""
