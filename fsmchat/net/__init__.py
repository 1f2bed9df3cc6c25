"""The loop and its sockets, knowing nothing of chat: the one ``select`` loop and its timers
(``loop``), the socket base every kind of socket in it builds on (``sock``), a socket's outgoing
queue (``outqueue``), signals as a descriptor (``signals``) and the server's TLS context
(``tls``)."""
