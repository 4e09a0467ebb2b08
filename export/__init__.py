"""export stage of qdefend."""
