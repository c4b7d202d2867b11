"""Vendor look-alike servers with fault injection, so everything runs and is tested offline.

Depends on ``marketpipe.core`` only; the runtime imports it only for ``marketpipe demo`` and
``marketpipe sim``. Public API:

* :class:`marketpipe.sim.data.SimMarket` — the deterministic synthetic market (pure Python API).
* :class:`marketpipe.sim.faults.Faults`, :class:`marketpipe.sim.faults.FaultRule` — fault injection.
* :class:`marketpipe.sim.server.SimServer`, :func:`marketpipe.sim.server.serve_forever` — the
  Alpaca data API v2 (stocks) look-alike over HTTP (or another vendor's face, ``vendor=``);
  :func:`marketpipe.sim.server.serve_vendors_forever` every face at once, one port each (``marketpipe sim``).

Import from the submodules; this package imports nothing so that ``import marketpipe.sim`` stays cheap.
"""
