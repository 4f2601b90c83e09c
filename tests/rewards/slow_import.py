"""A reward function whose module takes longer to import than a call may take."""

import time

time.sleep(2.0)


def one(prompt, response, record):
  return 1.0
