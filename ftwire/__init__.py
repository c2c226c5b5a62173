"""What the lighthouse and the training processes share on the wire.

The message format (msgpack with decode-time limits and typed field
readers), the bearer-token check and error answers, the background event
loop and the log setup.  Both ``lighthouse`` and ``ftdiloco`` depend on this
package; it depends on neither, and imports no torch.
"""
