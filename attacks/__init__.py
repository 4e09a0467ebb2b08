"""attacks stage of qdefend."""
