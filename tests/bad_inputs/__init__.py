"""The bad-input corpus: files tforge must refuse with one line, exit 1 and nothing written."""
