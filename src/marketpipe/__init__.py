"""marketpipe: market data fetched, checked, kept and served."""
