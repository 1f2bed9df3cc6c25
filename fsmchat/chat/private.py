"""Private messages: ``/msg NAME text`` reaches one person, wherever they are connected.

The receiver sees ``*alice* text``, the sender ``-> *bob* text`` (an action is ``* alice
text``, with a blank after the star; a name has no ``*``, so neither can be typed by anyone
else). The person is looked up in the chat's ``Directory``: here, the line goes to them alone;
on another instance (``Directory.elsewhere``), it goes on the bus after ``@NAME\\n`` and that
instance hands it to them (``Chat.relayed``). A name nobody has gets one ``*** `` line.
Private lines are in no history.
"""

from __future__ import annotations

from fsmchat.chat.commands import COMMANDS, Call
from fsmchat.chat.payload import person_head
from fsmchat.chat.text import clean, is_name


@COMMANDS.command("msg", "/msg NAME TEXT", "say TEXT to NAME alone, in whatever room")
def _msg(call: Call) -> bool:
    name, _, text = call.argument.partition(b" ")
    text = text.strip(b" ")
    if not text:
        call.usage()
        return False
    chat, member = call.chat, call.member
    directory = chat.directory
    hub = chat.hub
    text = clean(text)
    line = b"*%s* %s\n" % (member.name, text)
    to = directory.find(name) if is_name(name) else None
    if to is member:
        call.answer(b"msg: that is you")
        return False
    if to is not None:
        hub.tell(to.client, line)
        name = to.name
    elif is_name(name) and directory.elsewhere(name):
        hub.publish(line, person_head(name))
    else:
        call.answer(b"msg: nobody here is called %s" % clean(name))
        return False
    hub.tell(call.client, b"-> *%s* %s\n" % (name, text))
    return True
