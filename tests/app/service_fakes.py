"""The fake runner lives in tests/fake_runner.py (shared with tests/core)."""

from fake_runner import *  # noqa: F401,F403
from fake_runner import EOS_ID, IMAGE_TOKENS, WORDS, FakeEngine  # noqa: F401
