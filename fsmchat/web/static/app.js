// fsmchat's chat page: one WebSocket to /ws on the host (and scheme) that served this page.
//
// Chat mode: the server sends text frames of whole lines, exactly what an nc user reads
// ("<name> text", "* name action", "*** notice"), and we send each typed line as one frame.
// The server never echoes our own lines back, so the page shows them itself.
// Raw mode: binary frames of relayed bytes and no names; they are shown as UTF-8 text.
//
// When the server closes or turns us away it says why: a "*** " line (chat mode), and the same
// words as the close frame's reason, whose code says what to do: 1013 (try again later: the
// chat is full, too many connections from this address, we read too slowly) is retried, with
// a delay that starts at 5 s and grows; 1008 (policy: not allowed from this address, idle for
// too long, kicked) is not, since trying again would change nothing: reload to come back.
//
// Rules kept here: text from the network reaches the page only through text nodes, never as
// HTML; nothing is stored in the browser; nothing is loaded from anywhere but this server.
"use strict";

(() => {
  const log = document.getElementById("log");
  const status = document.getElementById("status");
  const form = document.getElementById("compose");
  const input = document.getElementById("message");

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

  const WELCOME = /^\*\*\* welcome, you are (\S+) \(/;
  const RENAMED = /^\*\*\* you are now (\S+)$/;
  const SAID = /^<([^>\s]+)> (.*)$/s;
  const ACTION = /^\* (\S+) (.*)$/s;

  let socket = null;
  let delay = FIRST_DELAY_MS;
  let retryTimer = 0;
  let stableTimer = 0;
  let everConnected = false;
  let down = false; // a connection was lost and not yet made again
  let why = ""; // why it was lost, said until it is made again
  let quitting = false; // we typed /quit: the server closes, and we stay away
  let welcomed = false; // this connection's welcome line came: the chat took us in
  let refusal = ""; // the line the server last turned us away with: not shown again each try
  let againRow = null; // this connection's "connected again" row, undone if it is turned away
  let said = ""; // the last "*** " line this connection brought
  let me = null; // our name in chat mode (the welcome line, then "you are now")
  let raw = false; // binary frames came: a raw-mode server, where nobody has a name
  let lastSent = ""; // the last line sent, given back to the box if it was too long
  let tail = ""; // text after the last "\n" (frames should end in one; kept in case)
  let decoder = new TextDecoder("utf-8"); // not fatal: bytes that are not UTF-8 become U+FFFD

  // ---- the log ------------------------------------------------------------------------------

  function span(className, text) {
    const element = document.createElement("span");
    element.className = className;
    element.textContent = text;
    return element;
  }

  // "<bob>" as it arrived (so the log's text is exactly the line), the brackets dimmed and the
  // name coloured by a hash, so a person keeps the same colour on every line and every page.
  function who(name, open, close) {
    let hash = 0;
    for (const ch of name) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
    const element = span("name n" + (hash % 6), "");
    element.append(span("punct", open), name, span("punct", close));
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

  function showChatLine(line, mine) {
    const extra = mine ? " mine" : "";
    let match;
    if (line.startsWith("*** ")) {
      match = WELCOME.exec(line) || RENAMED.exec(line);
      if (match) me = match[1];
      said = line;
      if (WELCOME.test(line)) {
        welcomed = true;
        refusal = "";
      } else if (!welcomed && line === refusal) {
        return; // turned away again, for the same reason: the status line says it
      }
      add("notice" + extra, line);
    } else if ((match = ACTION.exec(line))) {
      add("action" + extra, "* ", who(match[1], "", ""), " " + match[2]);
    } else if ((match = SAID.exec(line))) {
      add("said" + extra, who(match[1], "<", ">"), " " + match[2]);
    } else {
      add("plain" + extra, line);
    }
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

  // What we typed, as the others see it (the server sends none of it back to us).
  function showOwn(text) {
    if (raw || me === null) {
      add("plain mine", text);
    } else if (text.startsWith("//")) {
      showChatLine("<" + me + "> " + text.slice(1), true);
    } else if (text.startsWith("/me ")) {
      showChatLine("* " + me + " " + text.slice(4), true);
    } else if (text.startsWith("/")) {
      add("command mine", text); // /nick, /who, /quit: the server answers with a notice
    } else {
      showChatLine("<" + me + "> " + text, true);
    }
  }

  // ---- the connection -----------------------------------------------------------------------

  function setStatus(text, isDown) {
    status.textContent = text;
    status.classList.toggle("down", isDown);
  }

  function connect() {
    retryTimer = 0;
    setStatus(everConnected ? "reconnecting…" : "connecting…", down);
    const ws = new WebSocket(WS_URL);
    let opened = false;
    ws.binaryType = "arraybuffer";
    socket = ws;
    ws.onopen = () => {
      opened = true;
      welcomed = false;
      againRow = null;
      said = "";
      tail = "";
      decoder = new TextDecoder("utf-8");
      setStatus(everConnected ? "connected again" : "connected", false);
      if (down) againRow = addLocal("connected again");
      everConnected = true;
      down = false;
      stableTimer = setTimeout(() => { delay = FIRST_DELAY_MS; }, STABLE_MS);
    };
    ws.onmessage = (event) => {
      if (typeof event.data === "string") onText(event.data);
      else onBytes(new Uint8Array(event.data));
    };
    ws.onclose = (event) => {
      clearTimeout(stableTimer);
      socket = null;
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

  // Enter in the box submits the form, as the Send button does.
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value;
    if (text === "") return;
    if (socket === null || socket.readyState !== WebSocket.OPEN) {
      setStatus("not connected — your message is still in the box", true);
      return;
    }
    // One frame, one line, as nc sends it; commands (/nick, /who, /me, /quit) go as typed.
    socket.send(text + "\n");
    lastSent = text;
    showOwn(text);
    if (!raw && me !== null && /^\/quit(\s|$)/.test(text)) quitting = true;
    input.value = "";
    input.focus();
  });

  connect();
})();
