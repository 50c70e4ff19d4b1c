# Shared test set-up. Run the suite with: python -m pytest -q tests
import os
import sys

# Triton kernels run on the CPU through Triton's interpreter; this must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHARED = os.environ.get("SCDPO_SHARED", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared"))
DATA = os.path.join(SHARED, "data")
