// Server-Sent Events from a fetch() body (EventSource cannot POST): yields each event's data,
// following the parsing rules of the HTML standard (CR/LF/CRLF line ends, multi-line data, comments).

export async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop(); // an incomplete last line waits for the next chunk
    for (const line of lines) {
      if (line === '') {
        if (data.length) yield data.join('\n');
        data = [];
      } else if (line.startsWith('data:')) {
        data.push(line.slice(line.startsWith('data: ') ? 6 : 5));
      }
      // other fields (event:, id:, retry:) and comments (:) are not used by chat streams
    }
  }
  if (data.length) yield data.join('\n');
}
