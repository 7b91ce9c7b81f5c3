"""Data rules in plain Python (no Kedro): record formats, validation, encoding, and the sample data sets."""
