"""The gateway's HTTP interface: REST v1, the Alpaca-compatible v2 routes, health, admin, metrics."""
