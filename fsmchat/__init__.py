"""fsmchat: an event-driven chat relay with one select() loop and a state machine per connection."""

__version__ = "0.1.0"
