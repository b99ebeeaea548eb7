// The status view: readiness, the serving model, the current or last deployment (phases, durations,
// live progress), the fleet in cluster mode, and the deployment history.

import { facts, h, seconds, when } from './dom.js';
import { running } from './feed.js';

const PHASE_ORDER = ['pending', 'resolving', 'downloading', 'loading', 'warming', 'ready', 'failed'];

function phaseClass(phase) {
  if (phase === 'ready') return 'phase phase-ready';
  if (phase === 'failed' || phase === 'rolled_back') return 'phase phase-failed';
  return 'phase phase-running';
}

function modelName(model) {
  return model.revision ? `${model.model_id} @ ${model.revision}` : model.model_id;
}

function progressOf(deployment, event) {
  if (event && event.deployment_id === deployment.id) {
    const label = `${event.stage}: ${event.done}${event.total ? ` of ${event.total}` : ''} ${event.unit}`;
    return { label, done: event.done, total: event.total };
  }
  const p = deployment.progress;
  if (!p) return null;
  const mib = (bytes) => `${(bytes / 2 ** 20).toFixed(1)} MiB`;
  return {
    label: `download: ${mib(p.bytes_done)}${p.bytes_total ? ` of ${mib(p.bytes_total)}` : ''}`,
    done: p.bytes_done,
    total: p.bytes_total,
  };
}

function renderDeployment(container, deployment, progressEvent) {
  if (!deployment) {
    container.replaceChildren(h('p', { class: 'muted' }, 'none yet'));
    return;
  }
  const done = Object.entries(deployment.phase_seconds)
    .filter(([phase]) => phase !== 'total' && phase !== deployment.phase)
    .sort(([a], [b]) => PHASE_ORDER.indexOf(a) - PHASE_ORDER.indexOf(b));
  const phases = h(
    'ol',
    { class: 'phases', 'aria-label': 'Phases' },
    ...done.map(([phase, s]) => h('li', {}, `${phase} ${seconds(s)}`)),
    h('li', { class: `current ${phaseClass(deployment.phase)}`, 'aria-current': 'step' }, deployment.phase),
  );
  const children = [
    h(
      'p',
      {},
      h('strong', {}, modelName(deployment)),
      ` (${deployment.trigger}) `,
      h('span', { class: phaseClass(deployment.phase), 'data-phase': deployment.phase }, deployment.phase),
      ` · ${seconds(deployment.duration_s)}`,
    ),
    phases,
  ];
  const progress = running(deployment) ? progressOf(deployment, progressEvent) : null;
  if (progress) {
    const bar = h('progress', { max: progress.total || undefined, 'aria-label': progress.label });
    if (progress.total) bar.value = progress.done;
    children.push(bar, h('p', { class: 'muted' }, progress.label));
  }
  if (deployment.error) children.push(h('p', { class: 'error' }, `Reason: ${deployment.error}`));
  container.replaceChildren(...children);
}

function renderFleet(section, body, fleet) {
  section.hidden = !fleet;
  if (!fleet) return;
  const { desired, rollout, replicas, connection } = fleet;
  const rows = [
    ['desired', desired ? modelName(desired) : '—'],
    ['rollout', rollout ? `${rollout.phase} (${rollout.ready}/${rollout.total} ready)` : '—'],
    ['message', rollout?.message || '—'],
  ];
  if (rollout?.reason) rows.push(['reason', `${rollout.reason}${rollout.failed_replica ? ` (${rollout.failed_replica})` : ''}`]);
  if (desired?.previous) rows.push(['previous', modelName(desired.previous)]);
  rows.push(['Kubernetes API', connection]);
  const list = h('dl', { class: 'facts' });
  facts(list, rows);
  const table = h(
    'table',
    {},
    h('caption', { class: 'visually-hidden' }, 'Replicas'),
    h('thead', {}, h('tr', {}, ...['replica', 'model', 'phase', 'error', 'updated'].map((c) => h('th', { scope: 'col' }, c)))),
    h(
      'tbody',
      {},
      ...replicas.map((r) =>
        h(
          'tr',
          {},
          h('td', {}, r.name),
          h('td', {}, r.model_id ? modelName(r) : '—'),
          h('td', {}, h('span', { class: phaseClass(r.phase) }, r.phase || '—')),
          h('td', {}, r.error || ''),
          h('td', {}, when(r.updated_at)),
        ),
      ),
    ),
  );
  body.replaceChildren(list, h('div', { class: 'scroll' }, table));
}

function renderHistory(tbody, history) {
  tbody.replaceChildren(
    ...history.map((d) =>
      h(
        'tr',
        {},
        h('td', {}, modelName(d)),
        h('td', {}, d.trigger),
        h('td', {}, h('span', { class: phaseClass(d.phase), title: d.error || undefined }, d.phase)),
        h('td', {}, seconds(d.duration_s)),
        h('td', {}, when(d.created_at)),
      ),
    ),
  );
}

export function renderStatus(feed) {
  const readiness = document.getElementById('readiness');
  const { status } = feed;
  if (feed.mode === 'offline' || !status) {
    readiness.textContent = 'server unreachable';
    readiness.className = 'badge not-ready';
    return;
  }
  readiness.textContent = status.ready ? 'ready' : 'not ready';
  readiness.className = `badge ${status.ready ? 'ready' : 'not-ready'}`;
  readiness.title = feed.mode === 'events' ? 'live (event stream)' : 'polling GET /status';
  const s = status.serving;
  facts(
    document.getElementById('serving'),
    s
      ? [
          ['model', s.model_id],
          ['revision', s.revision],
          ['source', s.source],
          ['device', s.device],
          ['dtype', s.dtype],
          ['parameters', s.parameters.toLocaleString('en')],
          ['context', s.context_length],
          ['kernel', kernel(s.fast_path)],
          ['loaded at', when(s.loaded_at)],
        ]
      : [['model', 'none serving']],
  );
  renderDeployment(document.getElementById('deployment'), status.deployment, feed.progress);
  renderFleet(document.getElementById('fleet'), document.getElementById('fleet-body'), status.fleet);
  renderHistory(document.querySelector('#history tbody'), status.history);
}

/** Which kernel serves the linear layers: the fast path's with its layers per block format and its
 *  fused decoder layers, or PyTorch's with the reason the fast path does not apply. */
function kernel(fastPath) {
  if (!fastPath) return null;
  if (!fastPath.kernel) return `PyTorch (${fastPath.reason})`;
  const layers = Object.entries(fastPath.layers).map(([format, n]) => `${n} ${format}`);
  const fused = fastPath.fused_layers ? `; ${fastPath.fused_layers} decoder layers fused` : '';
  return `${fastPath.kernel}: ${layers.join(', ')} layers${fused}`;
}
