// The chat playground: streams replies from POST /v1/chat/completions (stream: true, usage in the
// last chunk) and shows each reply's figures. The Stop button aborts the fetch; the server sees the
// disconnect and cancels the generation. Model output only ever goes into textContent.

import { errorOf } from './api.js';
import { facts, h, seconds } from './dom.js';
import { sseData } from './sse.js';

function numberFrom(input) {
  const value = input.valueAsNumber;
  return Number.isFinite(value) ? value : undefined;
}

export function setupChat() {
  const form = document.getElementById('chat-form');
  const byId = (id) => document.getElementById(id);
  const [system, temperature, topP, maxTokens, stops, input] = [
    'chat-system', 'chat-temperature', 'chat-top-p', 'chat-max-tokens', 'chat-stop', 'chat-input',
  ].map(byId);
  const [send, stop, clear, transcript, errorLine, figures] = [
    'chat-send', 'chat-stop-button', 'chat-clear', 'transcript', 'chat-error', 'chat-figures',
  ].map(byId);
  let messages = [];
  let controller = null;

  function bubble(role, text) {
    const content = h('p', { class: 'content' }, text);
    transcript.append(h('li', { class: role }, h('span', { class: 'role' }, role), content));
    transcript.scrollTop = transcript.scrollHeight;
    return content;
  }

  function request() {
    const prompt = system.value.trim();
    const stopList = stops.value.split('\n').filter((s) => s !== '');
    return {
      messages: [...(prompt ? [{ role: 'system', content: prompt }] : []), ...messages],
      stream: true,
      stream_options: { include_usage: true },
      temperature: numberFrom(temperature),
      top_p: numberFrom(topP),
      max_tokens: numberFrom(maxTokens),
      ...(stopList.length ? { stop: stopList } : {}),
    };
  }

  async function converse() {
    const started = performance.now();
    let firstTokenAt = null;
    let reply = '';
    let finish = null;
    let usage = null;
    let deltas = 0; // tokens/s without usage (a stopped reply): about one token per delta
    const content = bubble('assistant', '');
    content.setAttribute('aria-busy', 'true');
    controller = new AbortController();
    try {
      const response = await fetch('/v1/chat/completions', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream' },
        body: JSON.stringify(request()),
        signal: controller.signal,
      });
      if (!response.ok) throw await errorOf(response);
      for await (const data of sseData(response.body)) {
        if (data === '[DONE]') break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(`${chunk.error.type}: ${chunk.error.message}`);
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices?.[0];
        if (choice?.delta?.content) {
          firstTokenAt ??= performance.now();
          deltas += 1;
          reply += choice.delta.content;
          content.textContent = reply;
          transcript.scrollTop = transcript.scrollHeight;
        }
        if (choice?.finish_reason) finish = choice.finish_reason;
      }
    } catch (error) {
      if (error.name === 'AbortError') finish = 'cancelled (stopped)';
      else errorLine.textContent = error.display ?? String(error);
      if (!reply && error.name !== 'AbortError') messages.pop(); // the unanswered message is not history
    } finally {
      controller = null;
      content.removeAttribute('aria-busy');
    }
    if (reply) messages.push({ role: 'assistant', content: reply });
    const ended = performance.now();
    const tokens = usage?.completion_tokens ?? deltas;
    const decodeS = firstTokenAt === null ? null : (ended - firstTokenAt) / 1000;
    facts(figures, [
      ['time to first token', seconds(firstTokenAt === null ? null : (firstTokenAt - started) / 1000)],
      ['tokens/s', tokens && decodeS ? (tokens / decodeS).toFixed(1) : '—'],
      ['finish reason', finish ?? '—'],
      ['usage', usage ? `${usage.prompt_tokens} prompt${cachedNote(usage)} + ${usage.completion_tokens} completion = ${usage.total_tokens} tokens` : '—'],
    ]);
  }

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const text = input.value;
    if (!text.trim() || controller) return;
    errorLine.textContent = '';
    messages.push({ role: 'user', content: text });
    bubble('user', text);
    input.value = '';
    send.disabled = true;
    stop.disabled = false;
    try {
      await converse();
    } finally {
      send.disabled = false;
      stop.disabled = true;
      input.focus();
    }
  });
  // Enter sends, Shift+Enter makes a new line (as in most chat UIs).
  input.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  stop.addEventListener('click', () => controller?.abort());
  clear.addEventListener('click', () => {
    controller?.abort();
    messages = [];
    transcript.replaceChildren();
    facts(figures, []);
    errorLine.textContent = '';
  });
}

// The prompt tokens the server's prefix cache already held (the conversation so far): " (31 cached)".
function cachedNote(usage) {
  const cached = usage.prompt_tokens_details?.cached_tokens;
  return cached ? ` (${cached} cached)` : '';
}
