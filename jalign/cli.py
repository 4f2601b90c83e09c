"""The ``jalign`` console script: ``jalign train --config=...`` is ``python -m jalign.train --config=...``."""

import sys

COMMANDS = {"train": "jalign.train", "plan": "jalign.plan", "demo": "jalign.demo"}


def main():
  if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    print(f"usage: jalign {{{','.join(COMMANDS)}}} [flags...]", file=sys.stderr)
    sys.exit(2)
  command = sys.argv.pop(1)
  sys.argv[0] = f"jalign {command}"
  if command in ("train", "plan"):
    import importlib
    importlib.import_module(COMMANDS[command]).entry()
  else:
    from jalign.demo import main as demo
    demo(sys.argv[1:])
