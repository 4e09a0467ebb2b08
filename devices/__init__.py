"""devices stage of qdefend."""
