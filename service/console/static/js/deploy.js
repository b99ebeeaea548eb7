// The deploy form: POST /model, then follow that deployment (through the status feed) to ready or
// failed. The admin token is read from its field when sending: never stored, never put in a URL
// (the field has no name, so even a native form submission could not carry it).

import { requestJSON } from './api.js';
import { TERMINAL_PHASES } from './feed.js';

export function setupDeploy(feed) {
  const form = document.getElementById('deploy-form');
  const modelInput = document.getElementById('deploy-model');
  const revisionInput = document.getElementById('deploy-revision');
  const tokenInput = document.getElementById('deploy-token');
  const submit = document.getElementById('deploy-submit');
  const message = document.getElementById('deploy-message');
  let watched = null; // {id, model_id, previous}

  function say(text, kind = '') {
    message.textContent = text;
    message.className = kind;
  }

  feed.subscribe(({ status }) => {
    const d = status?.deployment;
    if (!watched || !d || d.id !== watched.id) return;
    if (d.phase === 'ready') {
      say(`ready: ${d.model_id} now serves (${d.duration_s} s).`, 'phase-ready');
      watched = null;
    } else if (d.phase === 'failed') {
      const old = status.serving ? `${status.serving.model_id} still serves.` : 'No model serves.';
      say(`failed: ${d.error} ${old}`, 'error');
      watched = null;
    } else {
      say(`${d.model_id}: ${d.phase}…`);
    }
  });

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const model_id = modelInput.value.trim();
    if (!model_id) {
      say('Enter a model id.', 'error');
      modelInput.focus();
      return;
    }
    const revision = revisionInput.value.trim() || null;
    submit.disabled = true;
    say(`Deploying ${model_id}…`);
    try {
      const { status, body } = await requestJSON('/model', {
        method: 'POST',
        body: { model_id, revision },
        token: tokenInput.value,
      });
      if (status === 200 || TERMINAL_PHASES.has(body.phase)) {
        say(`${body.model_id} already serves.`, 'phase-ready');
      } else {
        watched = { id: body.id };
        say(`${body.model_id}: ${body.phase}…`);
      }
      feed.refresh();
    } catch (error) {
      say(error.display ?? String(error), 'error');
    } finally {
      submit.disabled = false;
    }
  });
}
