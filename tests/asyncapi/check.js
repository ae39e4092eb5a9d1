// Parse an AsyncAPI document with the official parser (@asyncapi/parser: the AsyncAPI JSON
// Schema of its version, $ref resolution including relative files, and the parser's own
// semantic rules) and print what it found as JSON: {parsed, diagnostics, summary}.
// Run by tests/unit/test_event_schemas.py: node check.js <file>
const { Parser, fromFile } = require('@asyncapi/parser');

(async () => {
  const parser = new Parser();
  const { document, diagnostics } = await fromFile(parser, process.argv[2]).parse();
  const summary = document ? {
    channels: document.channels().all().map((c) => c.address()),
    messages: document.components().messages().all().map((m) => m.name()),
    operations: document.operations().all().map((o) => ({
      id: o.id(),
      action: o.action(),
      channels: o.channels().all().map((c) => c.address()),
      messages: o.messages().all().map((m) => m.name()),
    })),
    payloads: Object.fromEntries(document.components().messages().all()
      .map((m) => [m.name(), m.payload() ? m.payload().title() : null])),
  } : null;
  const found = diagnostics.map((d) => ({
    severity: d.severity, code: d.code, message: d.message, path: d.path,
  }));
  console.log(JSON.stringify({ parsed: !!document, diagnostics: found, summary }));
})().catch((error) => {
  console.error(error);
  process.exit(2);
});
