// The load at a glance, from GET /status/load (computed by the server from its own metrics).

import { requestJSON } from './api.js';
import { facts, seconds } from './dom.js';

const REFRESH_MS = 3000;

function span(s) {
  return s < 120 ? `${Math.round(s)} s` : `${Math.round(s / 60)} min`;
}

export function setupLoad() {
  const list = document.getElementById('load');
  async function refresh() {
    try {
      const { body: load } = await requestJSON('/status/load');
      facts(list, [
        ['tokens/s', load.tokens_per_s.toFixed(1)],
        ['running', `${load.running} of ${load.max_running} slots`],
        ['queued', load.queued],
        ['TTFT p95', load.ttft_p95_s === null ? '—' : `${seconds(load.ttft_p95_s)} (last ${span(load.ttft_window_s)})`],
      ]);
    } catch {
      facts(list, [['load', 'unavailable']]);
    }
    setTimeout(refresh, REFRESH_MS);
  }
  refresh();
}
