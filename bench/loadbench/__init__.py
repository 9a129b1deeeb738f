"""Load benchmark of the real gateway against the fake model server (``bench/load.py``)."""
