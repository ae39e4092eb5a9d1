"""The creditwatch command and the tools it drives (dev, simulate, import, backtest)."""
