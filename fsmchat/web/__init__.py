"""The web port: the page, its files, and WebSocket clients of the chat."""
