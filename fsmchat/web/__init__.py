"""The web port: the chat page for browsers, served by the same loop as every other client."""
