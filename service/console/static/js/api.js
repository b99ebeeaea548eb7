// JSON requests to this server; a non-2xx answer becomes an ApiError carrying the server's own
// {"error": {"type", "message"}} body.

export class ApiError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status;
    this.type = type;
  }

  /** "401 unauthorized: this endpoint needs …" */
  get display() {
    return `${this.status} ${this.type}: ${this.message}`;
  }
}

export async function errorOf(response) {
  try {
    const { error } = await response.json();
    return new ApiError(response.status, error.type, error.message);
  } catch {
    return new ApiError(response.status, 'http_error', response.statusText || 'request failed');
  }
}

/** fetch + JSON both ways; resolves to {status, body}, rejects with ApiError on non-2xx. */
export async function requestJSON(url, { method = 'GET', body, token, signal } = {}) {
  const headers = { Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(url, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    cache: 'no-store',
  });
  if (!response.ok) throw await errorOf(response);
  return { status: response.status, body: await response.json() };
}
