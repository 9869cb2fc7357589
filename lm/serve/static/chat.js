// The chat page's behaviour. The conversation lives here, in `state.conversation` (an array of
// {role, content}), and is sent whole as `messages` on every turn: the server keeps nothing
// between requests. Replies stream from POST /v1/chat/completions as server-sent events
// (`data: {chunk json}` ... `data: [DONE]`), read with fetch + a ReadableStream reader; Stop
// aborts that fetch, and the server frees the request's slot when the connection drops.
//
// Max tokens is clamped to the served context: /v1/models gives `max_model_len`, /tokenize counts
// the conversation's prompt tokens, and a turn asks for at most the rest of the context (a reply
// longer than that is refused by the server, so the first message on a small model would fail).
//
// Model output only ever reaches the page through textContent, never innerHTML.
// `window.lmChat` exposes the state (conversation, request bodies sent) and the SSE reader to
// tests.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const el = {
    messages: $("messages"),
    composer: $("composer"),
    prompt: $("prompt"),
    send: $("send"),
    stop: $("stop"),
    temperature: $("temperature"),
    maxTokens: $("max_tokens"),
    apiKey: $("api_key"),
    clear: $("clear"),
    error: $("error"),
    modelName: $("model_name"),
  };
  const API_KEY_STORAGE = "lm-chat.api-key";

  const state = {
    conversation: [], // [{role: "user" | "assistant", content: string}], oldest first
    requests: [], // every request body sent, oldest first
    model: null, // the id /v1/models reports; sent as `model`
    maxModelLen: null, // the context /v1/models reports, in tokens
    busy: false,
    controller: null, // the AbortController of the reply streaming now
  };
  window.lmChat = { state, serverSentData };

  // ---- small page helpers ------------------------------------------------------------------

  function showError(message) {
    el.error.textContent = message;
    el.error.hidden = false;
  }

  function clearError() {
    el.error.textContent = "";
    el.error.hidden = true;
  }

  function scrollToEnd() {
    el.messages.scrollTop = el.messages.scrollHeight;
  }

  function addMessage(role, text) {
    const root = document.createElement("div");
    root.className = "message";
    root.dataset.role = role;
    const content = document.createElement("span");
    content.className = "content";
    content.textContent = text;
    root.append(content);
    el.messages.append(root);
    scrollToEnd();
    return root;
  }

  function addMeta(root, text) {
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = text;
    root.append(meta);
  }

  function setBusy(busy) {
    state.busy = busy;
    el.send.disabled = busy;
    el.stop.disabled = !busy;
  }

  function authHeaders() {
    const key = el.apiKey.value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  // Temperature in [0, 2] and a whole max_tokens >= 1, or an Error whose message says what to fix.
  function readSettings() {
    const temperature = Number(el.temperature.value);
    if (el.temperature.value.trim() === "" || !Number.isFinite(temperature) ||
        temperature < 0 || temperature > 2) {
      throw new Error("Temperature must be a number from 0 to 2.");
    }
    const maxTokens = Number(el.maxTokens.value);
    if (!Number.isInteger(maxTokens) || maxTokens < 1) {
      throw new Error("Max tokens must be a whole number of at least 1.");
    }
    return { temperature, maxTokens };
  }

  // ---- talking to the server ---------------------------------------------------------------

  async function loadModel() {
    try {
      const resp = await fetch("/v1/models", { headers: authHeaders() });
      if (!resp.ok) return null;
      const body = await resp.json();
      const card = body && Array.isArray(body.data) && body.data[0];
      if (!card || !card.id) return null;
      el.modelName.textContent = card.id;
      if (Number.isInteger(card.max_model_len) && card.max_model_len > 1) {
        showContext(card.max_model_len);
      }
      return card.id;
    } catch (_) {
      return null;
    }
  }

  // Records the served context and keeps the Max tokens field within it: its upper bound, and an
  // untouched default lowered to the largest reply the context could hold.
  function showContext(maxModelLen) {
    state.maxModelLen = maxModelLen;
    el.maxTokens.max = String(maxModelLen - 1);
    const untouched = el.maxTokens.value === el.maxTokens.defaultValue;
    if (untouched && Number(el.maxTokens.value) > maxModelLen - 1) {
      el.maxTokens.value = String(maxModelLen - 1);
    }
  }

  // The max_tokens to send: the asked number, at most what the context leaves after the
  // conversation's prompt (counted by POST /tokenize with the same chat template the reply uses).
  // Without a known context or a count, the asked number goes as it is and the server judges it.
  async function fitMaxTokens(messages, asked) {
    if (!state.maxModelLen) return asked;
    let count = null;
    try {
      const resp = await fetch("/tokenize", {
        method: "POST",
        headers: { "Content-Type": "application/json", ...authHeaders() },
        body: JSON.stringify({ model: state.model || undefined, messages }),
      });
      if (resp.ok) count = (await resp.json()).count;
    } catch (_) {
      // unreachable: the chat request will say so
    }
    if (!Number.isInteger(count)) return Math.min(asked, state.maxModelLen - 1);
    const room = state.maxModelLen - count;
    if (room < 1) {
      throw new Error(`The conversation (${count} tokens) fills the model's context of ` +
        `${state.maxModelLen} tokens; start a New chat.`);
    }
    return Math.min(asked, room);
  }

  // The message of an error response: OpenAI's {"error": {"message"}}, FastAPI's {"detail"}, or
  // the status line and the start of the body.
  async function errorMessage(resp) {
    let text = "";
    try {
      text = await resp.text();
    } catch (_) {
      // keep the status line alone
    }
    try {
      const body = JSON.parse(text);
      if (body && body.error && body.error.message) return String(body.error.message);
      if (body && body.detail !== undefined) {
        return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      }
    } catch (_) {
      // not JSON
    }
    const status = `${resp.status} ${resp.statusText}`.trim();
    return text ? `${status}: ${text.slice(0, 300)}` : status;
  }

  // Yields the data of each server-sent event in `body`. Network chunks split anywhere, even
  // inside a line or a UTF-8 character: the streaming decoder holds partial characters and
  // `buffer` holds the partial line until its newline arrives.
  async function* serverSentData(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let data = [];
    const takeLine = (line) => {
      if (line.endsWith("\r")) line = line.slice(0, -1);
      if (line === "") {
        const event = data.length ? data.join("\n") : null;
        data = [];
        return event;
      }
      if (line.startsWith(":")) return null; // a comment (keep-alive)
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") data.push(value);
      return null;
    };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n")) >= 0) {
          const event = takeLine(buffer.slice(0, end));
          buffer = buffer.slice(end + 1);
          if (event !== null) yield event;
        }
        if (done) {
          // A last event without its blank line still counts.
          if (buffer) takeLine(buffer);
          const event = takeLine("");
          if (event !== null) yield event;
          return;
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  // ---- one turn ----------------------------------------------------------------------------

  async function send() {
    if (state.busy) return;
    const text = el.prompt.value;
    if (!text.trim()) return;
    clearError();
    let settings;
    try {
      settings = readSettings();
    } catch (err) {
      showError(err.message);
      return;
    }

    // "New chat" swaps in a fresh array; this turn keeps writing to the one it started in.
    const conversation = state.conversation;
    const userTurn = { role: "user", content: text };
    conversation.push(userTurn);
    el.prompt.value = "";
    const userElement = addMessage("user", text);
    const reply = addMessage("assistant", "");
    reply.dataset.state = "streaming";
    const content = reply.querySelector(".content");
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);

    let replyText = "";
    let finishReason = null;
    // A turn that produced no reply leaves the conversation, so the next request does not carry
    // two user messages in a row; its text goes back in the box to retry.
    const dropTurn = () => {
      const at = conversation.indexOf(userTurn);
      if (at >= 0) conversation.splice(at, 1);
      userElement.dataset.state = "failed";
      if (!el.prompt.value) el.prompt.value = text;
    };

    try {
      if (!state.model) state.model = await loadModel();
      const messages = conversation.map((m) => ({ role: m.role, content: m.content }));
      const body = {
        model: state.model || "default",
        messages,
        stream: true,
        temperature: settings.temperature,
        max_tokens: await fitMaxTokens(messages, settings.maxTokens),
      };
      state.requests.push(body);
      const resp = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: {
          "Content-Type": "application/json",
          Accept: "text/event-stream",
          ...authHeaders(),
        },
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!resp.ok) throw new Error(await errorMessage(resp));
      if (!resp.body) throw new Error("The server sent no reply stream.");

      let sawDone = false;
      for await (const data of serverSentData(resp.body)) {
        if (data === "[DONE]") {
          sawDone = true;
          break;
        }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || "The server reported an error.");
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          replyText += piece;
          content.textContent = replyText;
          scrollToEnd();
        }
        if (choice.finish_reason) finishReason = choice.finish_reason;
      }
      if (!sawDone) throw new Error("The reply stream ended before [DONE].");

      conversation.push({ role: "assistant", content: replyText });
      reply.dataset.state = "done";
      reply.classList.add("finished");
      addMeta(reply, replyText ? `finish: ${finishReason || "stop"}` :
        `empty reply (finish: ${finishReason || "stop"})`);
    } catch (err) {
      if (err.name === "AbortError" || controller.signal.aborted) {
        reply.dataset.state = "stopped";
        addMeta(reply, "stopped");
        if (replyText) conversation.push({ role: "assistant", content: replyText });
        else dropTurn();
      } else {
        const message = err instanceof SyntaxError ? `Could not read the reply: ${err.message}`
          : err instanceof TypeError ? `Could not reach the server: ${err.message}`
            : err.message;
        reply.dataset.state = "error";
        addMeta(reply, `error: ${message}`);
        showError(message);
        dropTurn();
      }
    } finally {
      if (state.controller === controller) state.controller = null;
      setBusy(false);
      el.prompt.focus();
    }
  }

  // ---- wiring ------------------------------------------------------------------------------

  el.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });

  el.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });

  el.stop.addEventListener("click", () => {
    if (state.controller) state.controller.abort();
  });

  el.clear.addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.conversation = [];
    el.messages.replaceChildren();
    clearError();
    el.prompt.focus();
  });

  try {
    el.apiKey.value = localStorage.getItem(API_KEY_STORAGE) || "";
  } catch (_) {
    // storage disabled: the key lives only in the field
  }
  el.apiKey.addEventListener("input", () => {
    try {
      const key = el.apiKey.value.trim();
      if (key) localStorage.setItem(API_KEY_STORAGE, key);
      else localStorage.removeItem(API_KEY_STORAGE);
    } catch (_) {
      // storage disabled
    }
    state.model = null; // a new key may unlock /v1/models
  });

  loadModel().then((id) => {
    if (id && !state.model) state.model = id;
  });
  el.prompt.focus();
})();
