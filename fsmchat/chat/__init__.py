"""Chat mode for nc and telnet users: names, commands and clean text (``mode``), lines framed
from a byte stream (``framing``) and telnet's commands kept out of them (``telnet``). No sockets
here: the mode is an extension of the hub."""
