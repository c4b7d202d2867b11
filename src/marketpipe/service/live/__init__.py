"""The live hub, in parts with one job each:

* :mod:`.fanout` — clients, routes, bounded queues, slow-client handling;
* :mod:`.board` — the price board (last trade, quote and price per symbol; stale labelling);
* :mod:`.poller` — fallback REST polling while the router has failed over;
* :mod:`.bars` — the stream's minute bars in the store, gap backfill after reconnects, previous close;
* :mod:`.hub` — :class:`LiveHub`, which wires them to the upstream stream and the router.
"""

from marketpipe.service.live.fanout import (
    ALPACA_PROTOCOL,
    PRICES,
    WILDCARD,
    FanoutClient,
    Item,
    observe_delivery,
    unified_json,
    v1_json,
)
from marketpipe.service.live.hub import LiveHub, stream_url

__all__ = [
    "ALPACA_PROTOCOL",
    "PRICES",
    "WILDCARD",
    "FanoutClient",
    "Item",
    "LiveHub",
    "observe_delivery",
    "stream_url",
    "unified_json",
    "v1_json",
]
