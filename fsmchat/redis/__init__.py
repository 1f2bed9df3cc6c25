"""Several instances, one chat, through Redis: one connection to Redis as a socket of the loop
with a lifecycle of its own (``link``), and the pub/sub bus of an instance's two links with its
delivery rules (``bus``)."""
