// Building DOM nodes. Strings always become text nodes: nothing here ever parses HTML, so model
// output and server messages cannot inject markup.

/** h('li', {class: 'x'}, 'text', child) → an element; props set attributes, children are appended. */
export function h(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value !== undefined && value !== null && value !== false) element.setAttribute(name, value);
  }
  element.append(...children.filter((child) => child !== undefined && child !== null));
  return element;
}

/** Replace the definition list's content with [term, value] rows. */
export function facts(list, rows) {
  list.replaceChildren(...rows.flatMap(([term, value]) => [h('dt', {}, term), h('dd', {}, String(value ?? '—'))]));
}

export function seconds(value) {
  return value === null || value === undefined ? '—' : `${Number(value).toFixed(value < 10 ? 2 : 1)} s`;
}

/** A timestamp in the reader's locale: the time alone when it is today. */
export function when(iso) {
  if (!iso) return '—';
  const date = new Date(iso);
  const today = date.toDateString() === new Date().toDateString();
  return today ? date.toLocaleTimeString() : date.toLocaleString();
}
