"""KServe's Python model server as a baseline: set up (setup.sh) and started (launch.py) in its own venv."""
