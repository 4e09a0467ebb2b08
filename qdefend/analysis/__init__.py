"""analysis stage of qdefend."""
