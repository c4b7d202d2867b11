"""Each vendor's wire format, once: field letters and names, envelopes, channels, error and code
tables, paths, encoders and decoders. Shared by the adapters (``providers/``), the simulator (``sim/``)
and the vendor-compatible API (``api/``); depends on :mod:`marketpipe.core` only."""
