// fsmchat's chat page: one WebSocket to /ws on the host (and scheme) that served this page.
//
// Chat mode: the server sends text frames of whole lines, exactly what an nc user reads
// ("<name> text", "* name action", "*name* private", "-> *name* private, sent", "*** notice"),
// and we send each typed line as one frame. The server never echoes our own lines back (but a
// private one, as "-> *name* text"), so the page shows them itself. Raw mode: binary frames of
// relayed bytes and no names; they are shown as UTF-8 text.
//
// Rooms: the page keeps a list of the rooms and their sizes from the answers to "/rooms", which
// it asks after the welcome, and again (debounced: one question per ROOMS_DEBOUNCE_MS at most)
// after a live join or leave notice, a room change, the list being opened or the tab shown
// again; never because of an answer, so it cannot loop. Answers to the page's own questions are
// not shown in the log (one typed by the person is). The room we are in comes from "*** you are
// now in ROOM" (and, after the welcome, the lobby: the first room of the list), its topic from
// the topic lines. Replayed history ("*** recent messages:" ... "*** end of recent messages",
// each line after its HH:MM) is shown muted, and changes none of that: it is the past.
//
// Coming back: the page asks for the subprotocol "fsmchat.ids"; a chat-mode server that takes
// it puts the id of every room message in front of its frame ("\x1e" ID "\n", then the lines),
// history included, and sends the id of each public line of ours alone (it does not echo them).
// The page keeps the last SEEN_IDS ids it showed, and the room they are of; a connection made
// again asks "/ws?room=ROOM&after=ID,...,ID" (newest last), so that the server (this one or
// another of the same chat) seats it in that room ("*** you are now in ROOM") and, instead of
// the room's history, sends only what was said after them ("*** missed while you were away:"
// ... "*** end of missed messages", each line after its HH:MM, shown muted as history is), or
// nothing if nothing was; or says the gap is too old, then gives the history. Of what was
// missed, the page leaves out what it showed itself: our old name's leave, and our lines whose
// id never came back before the connection was lost. A new room (/join) starts a new list.
//
// When the server closes or turns us away it says why: a "*** " line (chat mode), and the same
// words as the close frame's reason, whose code says what to do: 1013 (try again later: the
// chat is full, too many connections from this address, we read too slowly) is retried, with
// a delay that starts at 5 s and grows; 1008 (policy: not allowed from this address, idle for
// too long, kicked) is not, since trying again would change nothing: reload to come back.
//
// Rules kept here: text from the network reaches the page only through text nodes, never as
// HTML; nothing is stored in the browser; nothing is loaded from anywhere but this server; a
// password we send (/login, /nick NAME PASSWORD, /pass, or a line while the server asks for
// the join password) is never shown: the log says "••••" instead.
"use strict";

(() => {
  const log = document.getElementById("log");
  const status = document.getElementById("status");
  const form = document.getElementById("compose");
  const input = document.getElementById("message");
  const place = document.getElementById("place");
  const roomName = document.getElementById("room-name");
  const topicText = document.getElementById("topic");
  const roomsNav = document.getElementById("rooms");
  const roomList = document.getElementById("room-list");
  const roomsToggle = document.getElementById("rooms-toggle");
  const joinForm = document.getElementById("join");
  const newRoom = document.getElementById("new-room");

  const WS_URL = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
  const FIRST_DELAY_MS = 1000;
  const MAX_DELAY_MS = 30000;
  const TRY_AGAIN_LATER_MS = 5000; // the least wait after a 1013 ("try again later")
  const TRY_AGAIN_LATER = 1013;
  const POLICY = 1008;
  // Only a connection that lasted is a success: resetting the delay as soon as one opens would
  // hammer a server that accepts and then turns us away (a full chat, a denied address).
  const STABLE_MS = 10000;
  // Older lines are dropped, so a tab left open for days stays light.
  const MAX_LINES = 2000;
  // A burst of joins and leaves (a class arriving) is one "/rooms", not one each.
  const ROOMS_DEBOUNCE_MS = 500;
  const MASK = "••••"; // in place of a password: always four, whatever its length
  const IDS = "fsmchat.ids"; // the subprotocol of a page that reads the ids of messages
  const ID_MARK = "\x1e"; // starts the id in front of a frame
  const SEEN_IDS = 16; // the ids of the last messages shown, sent when coming back
  const OWN_LINES = 16; // our own lines whose id has not come back, kept at most

  const WELCOME = /^\*\*\* welcome, you are (\S+) \(/;
  const RENAMED = /^\*\*\* you are now (\S+)$/;
  const MOVED = /^\*\*\* you are now in (\S+)$|^\*\*\* you are in (\S+) already$/;
  const ROOMS = /^\*\*\* \d+ rooms?: (.*)$/;
  const WHO = /^\*\*\* \d+ in (\S+): /;
  const CAME_OR_WENT = /^\*\*\* \S+ (?:joined|left) \S+$/;
  const TOPIC = /^\*\*\* topic of (\S+): (.*) \(set by [^\s()]+\)$/;
  const TOPIC_SET = /^\*\*\* \S+ set the topic of (\S+): (.*)$/;
  const NO_TOPIC = /^\*\*\* no topic is set in (\S+)$/;
  const PROMPT = /^\*\*\* this chat needs a password/;
  const RECENT = "*** recent messages:";
  const END_OF_RECENT = "*** end of recent messages";
  const MISSED = "*** missed while you were away:";
  const END_OF_MISSED = "*** end of missed messages";
  const LEFT = /^\*\*\* (\S+) left (\S+)$/;
  const STAMPED = /^(\d\d:\d\d) (.*)$/s; // a replayed line: its time, then the line
  const SAID = /^<([^>\s]+)> (.*)$/s;
  const ACTION = /^\* (\S+) (.*)$/s;
  const PRIVATE = /^\*([^*\s]+)\* (.*)$/s; // to us alone
  const PRIVATE_SENT = /^-> \*([^*\s]+)\* (.*)$/s; // the server's echo of one we sent
  // What we type that holds a password: the part kept, then the password.
  const WITH_PASSWORD = /^(\/(?:login|nick)\s+\S+)\s+\S/i;
  const PASS = /^(\/pass)\s+\S/i;

  let socket = null;
  let delay = FIRST_DELAY_MS;
  let retryTimer = 0;
  let stableTimer = 0;
  let everConnected = false;
  let down = false; // a connection was lost and not yet made again
  let why = ""; // why it was lost, said until it is made again
  let quitting = false; // we typed /quit: the server closes, and we stay away
  let welcomed = false; // this connection's welcome line came: the chat took us in
  let asked = false; // the server asks for the join password (not yet welcomed)
  let refusal = ""; // the line the server last turned us away with: not shown again each try
  let againRow = null; // this connection's "connected again" row, undone if it is turned away
  let said = ""; // the last "*** " line this connection brought
  let me = null; // our name in chat mode (the welcome line, then "you are now")
  let raw = false; // binary frames came: a raw-mode server, where nobody has a name
  let lastSent = ""; // the last line sent, given back to the box if it was too long
  let tail = ""; // text after the last "\n" (frames should end in one; kept in case)
  let decoder = new TextDecoder("utf-8"); // not fatal: bytes that are not UTF-8 become U+FFFD
  let past = false; // between "*** recent messages:" and its end: replayed history
  let room = null; // the room we are in, as the server names it (null: not known yet)
  let rooms = []; // [name, size] from the last answer to /rooms, in the server's order
  let roomsAsked = 0; // answers to /rooms the page asked for itself, still to come
  let roomsTimer = 0;
  let drawn = ""; // what the room list shows (drawRooms)
  let seen = []; // the ids of the last messages shown (SEEN_IDS at most), newest last
  let seenRoom = null; // the room they are of (null: the one a welcome seats us in, the lobby)
  let ownLines = []; // our public lines sent whose id has not come back, as others see them
  let unconfirmed = []; // the same, of the connection before this one (left out of "missed")
  let previous = null; // our name on the connection before this one
  let missed = null; // between "*** missed while you were away:" and its end: the lines

  // ---- the log ------------------------------------------------------------------------------

  function span(className, text) {
    const element = document.createElement("span");
    element.className = className;
    element.textContent = text;
    return element;
  }

  // "<bob>" as it arrived (so the log's text is exactly the line), the brackets dimmed and the
  // name coloured by a hash, so a person keeps the same colour on every line and every page.
  // Someone else's name is a button: it starts a private message to them. It is not a tab
  // stop (a long log would be hundreds of them); screen readers reach it, and keyboards can
  // type /msg NAME.
  function who(name, open, close) {
    let hash = 0;
    for (const ch of name) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
    const element = span("name n" + (hash % 6), "");
    let label = name;
    if (me === null || name.toLowerCase() !== me.toLowerCase()) {
      label = document.createElement("button");
      label.type = "button";
      label.tabIndex = -1;
      label.className = "to";
      label.dataset.name = name;
      label.title = "write to " + name + " alone";
      label.textContent = name;
    }
    element.append(span("punct", open), label, span("punct", close));
    return element;
  }

  // One row of the log. Strings are appended as text nodes: markup in them stays text.
  function add(kind, ...parts) {
    const atEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    const row = document.createElement("p");
    row.className = "line " + kind;
    row.append(...parts);
    log.append(row);
    while (log.childElementCount > MAX_LINES) log.firstElementChild.remove();
    // Follow new lines, unless the reader has scrolled up to read older ones.
    if (atEnd || kind.includes("mine")) log.scrollTop = log.scrollHeight;
    return row;
  }

  // A line about the connection itself: seen in the log, but not announced twice (the status
  // line, a live region of its own, already says it).
  function addLocal(text) {
    const row = add("local", text);
    row.setAttribute("aria-hidden", "true");
    return row;
  }

  // How a line looks: its kind (a class) and its parts, whose text is the line.
  function shape(line) {
    let match;
    if (line.startsWith("*** ")) return ["notice", [line]];
    if ((match = PRIVATE_SENT.exec(line))) {
      return ["private sent", [span("punct", "-> *"), who(match[1], "", ""),
        span("punct", "*"), " " + match[2]]];
    }
    if ((match = PRIVATE.exec(line))) {
      return ["private", [span("punct", "*"), who(match[1], "", ""), span("punct", "*"),
        " " + match[2]]];
    }
    if ((match = ACTION.exec(line))) return ["action", ["* ", who(match[1], "", ""), " " + match[2]]];
    if ((match = SAID.exec(line))) return ["said", [who(match[1], "<", ">"), " " + match[2]]];
    return ["plain", [line]];
  }

  function showChatLine(line, mine) {
    if (missed !== null && !mine) {
      if (line === END_OF_MISSED) showMissed();
      else missed.push(line);
      return;
    }
    if (past && !mine) {
      showPast(line);
      return;
    }
    if (line.startsWith("*** ") && !mine && notice(line)) return;
    const [kind, parts] = shape(line);
    // The echo of a private line is ours: drawn as our own lines are.
    add(kind + (mine || kind === "private sent" ? " mine" : ""), ...parts);
  }

  // A replayed line: muted, after its time; it changes nothing (who we are, where, the topic).
  function showPast(line) {
    if (line === END_OF_RECENT) {
      past = false;
      add("notice frame", line);
      return;
    }
    const match = STAMPED.exec(line);
    if (match === null) {
      add("past plain", line); // (not from this server: shown as it came)
      return;
    }
    const [kind, parts] = shape(match[2]);
    add("past " + kind, span("time", match[1] + " "), ...parts);
  }

  // What was missed, once its frame is whole: shown as history is, without what we showed
  // ourselves already; nothing at all if that was all.
  function showMissed() {
    const lines = missed.filter((line) => !shownBefore(line));
    missed = null;
    unconfirmed = [];
    if (lines.length === 0) return;
    add("notice frame", MISSED);
    for (const line of lines) showPast(line);
    add("notice frame", END_OF_MISSED);
  }

  // Whether a missed line (after its time) is one the page showed itself: our old name's leave
  // (said once we were gone), or a line of ours whose id did not come back before the loss.
  function shownBefore(line) {
    const match = STAMPED.exec(line);
    if (match === null) return false;
    const text = match[2];
    const left = LEFT.exec(text);
    if (left !== null && previous !== null && left[1].toLowerCase() === previous.toLowerCase()) {
      return true;
    }
    const index = unconfirmed.indexOf(text);
    if (index < 0) return false;
    unconfirmed.splice(index, 1);
    return true;
  }

  // An id that came in front of a frame: the newest message shown. An id alone is one of our
  // own lines': it is no longer unconfirmed.
  function takeId(id, alone) {
    if (seen[seen.length - 1] !== id) seen.push(id);
    if (seen.length > SEEN_IDS) seen.shift();
    if (alone) ownLines.shift();
  }

  // Where a connection made again asks to come back: the room the ids are of, and the ids.
  function wsUrl() {
    if (seen.length === 0 && seenRoom === null) return WS_URL;
    const asked = [];
    if (seenRoom !== null) asked.push("room=" + encodeURIComponent(seenRoom));
    if (seen.length > 0) asked.push("after=" + seen.join(","));
    return WS_URL + "?" + asked.join("&");
  }

  // What a live "*** " line tells the page; true if it is not to be shown (an answer to the
  // page's own /rooms, or a refusal seen already).
  function notice(line) {
    let match;
    said = line;
    if ((match = WELCOME.exec(line))) {
      previous = me;
      me = match[1];
      unconfirmed = ownLines; // (what was missed comes next, if anything)
      ownLines = [];
      welcomed = true;
      asked = false;
      refusal = "";
      input.type = "text";
      askRooms(0);
    } else if (!welcomed && line === refusal) {
      return true; // turned away again, for the same reason: the status line says it
    } else if (!welcomed && PROMPT.test(line)) {
      // What is typed now is the join password: hidden in the box, masked in the log.
      asked = true;
      input.type = "password";
    } else if ((match = RENAMED.exec(line))) {
      me = match[1];
    } else if (line === RECENT) {
      past = true;
      add("notice frame", line);
      return true;
    } else if (line === MISSED) {
      missed = [];
      return true;
    } else if ((match = ROOMS.exec(line))) {
      const mine = roomsAsked > 0;
      if (mine) roomsAsked -= 1;
      if (takeRooms(match[1])) return mine;
    } else if ((match = MOVED.exec(line))) {
      if (match[1] && !sameRoom(match[1], seenRoom)) { // a new room: its ids start here
        seen = [];
        seenRoom = match[1];
      }
      enter(match[1] || match[2]);
      askRooms();
    } else if ((match = WHO.exec(line))) {
      enter(match[1]);
    } else if ((match = TOPIC.exec(line)) || (match = TOPIC_SET.exec(line))) {
      if (room === null) enter(match[1]); // (after the welcome: the room we start in)
      if (sameRoom(match[1], room)) showTopic(match[2]);
    } else if ((match = NO_TOPIC.exec(line))) {
      if (sameRoom(match[1], room)) showTopic("");
    } else if (CAME_OR_WENT.test(line)) {
      askRooms();
    }
    return false;
  }

  // Raw mode passes terminal escapes as they are; here they would be invisible, so control
  // characters are shown in caret notation (ESC as ^[), as chat mode shows them to nc users.
  function caret(text) {
    return text.replace(/[\x00-\x08\x0b-\x1f\x7f]/g, (ch) =>
      ch === "\x7f" ? "^?" : "^" + String.fromCharCode(ch.charCodeAt(0) + 64));
  }

  function onText(text) {
    const lines = (tail + text).split("\n");
    tail = lines.pop();
    for (const line of lines) showChatLine(line, false);
  }

  // A raw-mode frame is what one sender's recv returned: show it as its lines. stream: true
  // keeps a character split across two frames whole.
  function onBytes(bytes) {
    raw = true;
    const lines = decoder.decode(bytes, { stream: true }).split("\n");
    if (lines.length > 1 && lines[lines.length - 1] === "") lines.pop();
    for (const line of lines) add("plain", caret(line.replace(/\r$/, "")));
  }

  // What we typed, as the log may show it: a password is masked.
  function masked(text) {
    if (raw) return text;
    let match;
    if ((match = WITH_PASSWORD.exec(text)) || (match = PASS.exec(text))) {
      return match[1] + " " + MASK;
    }
    if (asked && !welcomed && !text.startsWith("/")) return MASK; // the join password itself
    return text;
  }

  // What we typed, as the others see it (the server sends none of it back to us, but the
  // echo of a private line).
  function showOwn(text) {
    const command = text.split(" ", 1)[0].toLowerCase();
    const rest = text.slice(command.length).replace(/^ +| +$/g, "");
    if (raw || me === null) {
      add("plain mine", text);
    } else if (text.startsWith("//")) {
      showSaid("<" + me + "> " + text.slice(1));
    } else if (command === "/me" && rest !== "") {
      showSaid("* " + me + " " + rest);
    } else if (command === "/msg") {
      // The server answers: "-> *name* text" once it is sent, a "*** " line if not.
    } else if (text.startsWith("/")) {
      add("command mine", text); // /nick, /who, /quit: the server answers with a notice
    } else {
      showSaid("<" + me + "> " + text);
    }
  }

  // A public line of ours: shown now, and kept until its id comes back.
  function showSaid(line) {
    showChatLine(line, true);
    if (socket !== null && socket.protocol === IDS) {
      ownLines.push(line);
      if (ownLines.length > OWN_LINES) ownLines.shift();
    }
  }

  // ---- rooms --------------------------------------------------------------------------------

  function sameRoom(a, b) {
    return a !== null && b !== null && a.toLowerCase() === b.toLowerCase();
  }

  // Ask the server for the rooms, once for any number of reasons within the next wait. A
  // hidden tab asks nothing (it would seem active to --idle-timeout); it asks when shown again.
  function askRooms(wait = ROOMS_DEBOUNCE_MS) {
    if (roomsTimer || raw || !welcomed || document.hidden) return;
    roomsTimer = setTimeout(() => {
      roomsTimer = 0;
      if (socket !== null && socket.readyState === WebSocket.OPEN && welcomed && !quitting) {
        socket.send("/rooms\n");
        roomsAsked += 1;
      }
    }, wait);
  }

  // "lobby (3), math (1)": names have no blanks, so the words go name, "(size)," in turn.
  function takeRooms(list) {
    const words = list.split(" ");
    const found = [];
    for (let i = 0; i + 1 < words.length; i += 2) {
      const size = /^\((\d+)\),?$/.exec(words[i + 1]);
      if (size === null) return false; // not an answer we understand: shown, nothing changed
      found.push([words[i], Number(size[1])]);
    }
    if (found.length === 0) return false;
    rooms = found;
    if (room === null) enter(found[0][0]); // after the welcome: the lobby, listed first
    drawRooms();
    roomsNav.hidden = roomsToggle.hidden = false;
    return true;
  }

  // The list is drawn again only when it changed: a button under the pointer or the focus
  // stays the same element.
  function drawRooms() {
    const drawing = JSON.stringify([rooms, room === null ? null : room.toLowerCase()]);
    if (drawing === drawn) return;
    drawn = drawing;
    const buttons = [];
    for (const [name, size] of rooms) {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "room";
      button.dataset.room = name;
      button.setAttribute("aria-label", name + ", " + size + (size === 1 ? " person" : " people"));
      button.append(span("room-name", name), span("size", String(size)));
      if (sameRoom(name, room)) button.setAttribute("aria-current", "true");
      item.append(button);
      buttons.push(item);
    }
    const focused = document.activeElement;
    const again = focused !== null && roomList.contains(focused) ? focused.dataset.room : null;
    roomList.replaceChildren(...buttons);
    if (again !== null) { // the list was redrawn under the keyboard's focus: keep it there
      for (const button of roomList.querySelectorAll("button")) {
        if (button.dataset.room === again) button.focus();
      }
    }
  }

  function enter(name) {
    if (room === null || !sameRoom(room, name)) showTopic("");
    room = name;
    roomName.textContent = name;
    place.hidden = false;
    document.title = name + " — fsmchat";
    drawRooms();
  }

  function showTopic(text) {
    topicText.textContent = text;
    topicText.hidden = text === "";
  }

  function forgetRooms() {
    clearTimeout(roomsTimer);
    roomsTimer = 0;
    roomsAsked = 0;
    room = null;
    rooms = [];
    drawn = "";
    roomList.replaceChildren();
    roomsNav.hidden = roomsToggle.hidden = place.hidden = true;
    showTopic("");
    document.title = "fsmchat";
  }

  // On a narrow screen the list folds away; the button in the header opens it.
  function openRooms(open) {
    roomsToggle.setAttribute("aria-expanded", String(open));
    roomsNav.classList.toggle("open", open);
    if (open) askRooms(0);
  }

  roomsToggle.addEventListener("click", () => {
    openRooms(roomsToggle.getAttribute("aria-expanded") !== "true");
  });

  roomList.addEventListener("click", (event) => {
    const button = event.target.closest("button.room");
    if (button === null) return;
    if (!sameRoom(button.dataset.room, room)) send("/join " + button.dataset.room);
    if (roomsNav.classList.contains("open")) {
      openRooms(false);
      roomsToggle.focus(); // the list is gone: the focus goes back where it opened
    }
  });

  joinForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const name = newRoom.value.trim();
    if (name === "") return;
    if (send("/join " + name)) {
      newRoom.value = "";
      if (roomsNav.classList.contains("open")) openRooms(false);
      input.focus();
    }
  });

  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && roomsNav.classList.contains("open")) {
      openRooms(false);
      roomsToggle.focus();
    }
  });

  // Sizes of the other rooms change without a word to us: look again when the tab is back.
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") askRooms();
  });

  // A name in the log starts a private message to that person.
  log.addEventListener("click", (event) => {
    const button = event.target.closest("button.to");
    if (button === null) return;
    input.value = "/msg " + button.dataset.name + " ";
    input.focus();
    input.setSelectionRange(input.value.length, input.value.length);
  });

  // ---- the connection -----------------------------------------------------------------------

  function setStatus(text, isDown) {
    status.textContent = text;
    status.classList.toggle("down", isDown);
  }

  function connect() {
    retryTimer = 0;
    setStatus(everConnected ? "reconnecting…" : "connecting…", down);
    const ws = new WebSocket(wsUrl(), [IDS]); // (a raw-mode server takes no subprotocol)
    let opened = false;
    ws.binaryType = "arraybuffer";
    socket = ws;
    ws.onopen = () => {
      opened = true;
      welcomed = false;
      asked = false;
      againRow = null;
      said = "";
      tail = "";
      past = false;
      missed = null;
      forgetRooms();
      decoder = new TextDecoder("utf-8");
      setStatus(everConnected ? "connected again" : "connected", false);
      if (down) againRow = addLocal("connected again");
      everConnected = true;
      down = false;
      stableTimer = setTimeout(() => { delay = FIRST_DELAY_MS; }, STABLE_MS);
    };
    ws.onmessage = (event) => {
      if (typeof event.data !== "string") {
        onBytes(new Uint8Array(event.data));
      } else if (ws.protocol === IDS && event.data.startsWith(ID_MARK)) {
        const end = event.data.indexOf("\n");
        const text = event.data.slice(end + 1);
        if (end > 0) takeId(event.data.slice(1, end), text === "");
        if (text !== "") onText(text);
      } else {
        onText(event.data);
      }
    };
    ws.onclose = (event) => {
      clearTimeout(stableTimer);
      socket = null;
      input.type = "text";
      if (quitting) {
        setStatus("you left the chat — reload the page to come back", true);
        return;
      }
      const told = event.code === TRY_AGAIN_LATER || event.code === POLICY;
      if (told && !welcomed) {
        // Turned away at the door (the chat full, this address): the server said why, in a
        // "*** " line (chat mode) and in the close frame's reason. Once is enough in the log.
        why = event.reason || "the server turned us away";
        if (againRow !== null) againRow.remove();
        const line = "*** " + why;
        if (said !== line && line !== refusal) addLocal(why); // (raw mode: no line came)
        refusal = line;
      } else if (told) {
        why = event.reason || "the server closed the connection"; // its line is in the log
      } else if (opened || !down) {
        // A retry that found nobody keeps the reason the connection was lost for.
        why = everConnected ? "disconnected" : "cannot reach the server";
        if (event.code === 1001) why = "the server is shutting down or restarting";
        if (event.code === 1009) {
          why = "your message was too long for the server";
          if (input.value === "") input.value = lastSent; // to shorten it rather than retype it
        }
        if (everConnected) addLocal(why);
      }
      down = true;
      if (event.code === POLICY) {
        setStatus(why + " — reload the page to come back", true);
        return; // trying again would change nothing
      }
      if (event.code === TRY_AGAIN_LATER) delay = Math.max(delay, TRY_AGAIN_LATER_MS);
      // Jitter: pages dropped together by a restart do not all come back in the same instant.
      const wait = delay * (0.75 + Math.random() / 2);
      delay = Math.min(delay * 2, MAX_DELAY_MS);
      setStatus(why + " — reconnecting in " + Math.max(1, Math.round(wait / 1000)) + " s", true);
      retryTimer = setTimeout(connect, wait);
    };
  }

  // Back online (a phone leaving a tunnel): try now rather than at the end of a long wait.
  window.addEventListener("online", () => {
    if (retryTimer) {
      clearTimeout(retryTimer);
      connect();
    }
  });

  // One frame, one line, as nc sends it; commands (/nick, /who, /me, /quit) go as typed.
  // Whether it went.
  function send(text) {
    if (socket === null || socket.readyState !== WebSocket.OPEN) {
      setStatus("not connected — your message is still in the box", true);
      return false;
    }
    socket.send(text + "\n");
    const shown = masked(text);
    lastSent = shown === text ? text : ""; // a password is not put back in the box
    showOwn(shown);
    if (!raw && (me !== null || asked) && /^\/quit(\s|$)/i.test(text)) quitting = true;
    return true;
  }

  // Enter in the box submits the form, as the Send button does.
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value;
    if (text === "") return;
    if (send(text)) {
      input.value = "";
      input.focus();
    }
  });

  connect();
})();
