"""Setup, test and benchmark programs and the demo; run them from the repository root (``python3 -m scripts.demo``)."""
