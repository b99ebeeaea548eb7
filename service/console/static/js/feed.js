// The server's status, kept current: the deployment event stream (GET /status/events: snapshot,
// phase, progress, outcome, heartbeat) when the server has one, else polling GET /status (every
// second while a deployment runs, every 5 s otherwise). A dropped stream is polled over until
// EventSource reconnects (it resends Last-Event-ID, so the server replays what was missed).

import { requestJSON } from './api.js';

const EVENTS_URL = '/status/events';
const STATUS_URL = '/status';
const POLL_RUNNING_MS = 1000;
const POLL_IDLE_MS = 5000;
export const TERMINAL_PHASES = new Set(['ready', 'failed']);

export function running(deployment) {
  return Boolean(deployment) && !TERMINAL_PHASES.has(deployment.phase);
}

export class StatusFeed {
  #listeners = [];
  #timer = null;
  #streaming = false;
  status = null;
  /** The latest progress event of the running deployment ({deployment_id, stage, done, total, unit}). */
  progress = null;
  /** 'events', 'polling' or 'offline' (the last poll failed). */
  mode = 'polling';

  subscribe(listener) {
    this.#listeners.push(listener);
    if (this.status) listener(this);
  }

  start() {
    if ('EventSource' in window) this.#listen();
    this.refresh();
  }

  /** Fetch GET /status now (after a deploy request, or when a deployment ended). */
  async refresh() {
    try {
      const { body } = await requestJSON(STATUS_URL);
      this.#set(body);
    } catch {
      if (!this.#streaming) {
        this.mode = 'offline';
        this.#notify();
      }
    }
    this.#schedulePoll();
  }

  #listen() {
    const source = new EventSource(EVENTS_URL);
    source.addEventListener('snapshot', (event) => {
      this.#streaming = true;
      clearTimeout(this.#timer);
      this.#set(JSON.parse(event.data));
    });
    source.addEventListener('phase', (event) => this.#deployment(JSON.parse(event.data)));
    source.addEventListener('progress', (event) => {
      this.progress = JSON.parse(event.data);
      this.#notify();
    });
    // The outcome changes what serves and the history: read them whole.
    source.addEventListener('outcome', (event) => {
      this.#deployment(JSON.parse(event.data));
      this.refresh();
    });
    source.addEventListener('error', () => {
      // CLOSED: no stream here (e.g. 404) and EventSource gives up; CONNECTING: it retries.
      this.#streaming = false;
      this.#schedulePoll();
    });
  }

  #deployment(deployment) {
    if (!this.status) return;
    this.status.deployment = deployment;
    const history = this.status.history.filter((d) => d.id !== deployment.id);
    this.status.history = [deployment, ...history];
    if (!running(deployment)) this.progress = null;
    this.#notify();
  }

  #set(status) {
    this.status = status;
    if (!running(status.deployment)) this.progress = null;
    this.mode = this.#streaming ? 'events' : 'polling';
    this.#notify();
  }

  #schedulePoll() {
    clearTimeout(this.#timer);
    if (this.#streaming) return;
    const delay = running(this.status?.deployment) ? POLL_RUNNING_MS : POLL_IDLE_MS;
    this.#timer = setTimeout(() => this.refresh(), delay);
  }

  #notify() {
    for (const listener of this.#listeners) listener(this);
  }
}
