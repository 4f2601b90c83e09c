"""The ``jalign`` console script: ``jalign train --config=...`` is ``python -m jalign.train --config=...``,
and likewise ``jalign plan``, ``jalign serve``, ``jalign distill``, ``jalign steerlm``, ``jalign score`` and
``jalign export``; ``jalign evaluate`` measures a policy's accuracy on problems, ``jalign demo`` runs the
demo and ``jalign report`` draws runs."""

import sys

COMMANDS = {"train": "jalign.train", "plan": "jalign.plan", "serve": "jalign.serve.__main__", "distill": "jalign.distill",
            "steerlm": "jalign.steerlm", "score": "jalign.score", "export": "jalign.export", "demo": "jalign.demo",
            "report": "jalign.report", "evaluate": "jalign.evaluate"}


def main():
  if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    print(f"usage: jalign {{{','.join(COMMANDS)}}} [flags...]", file=sys.stderr)
    sys.exit(2)
  command = sys.argv.pop(1)
  sys.argv[0] = f"jalign {command}"
  if command in ("train", "plan", "serve", "distill"):
    import importlib
    importlib.import_module(COMMANDS[command]).entry()
  elif command == "steerlm":
    from jalign.steerlm import main as steerlm
    steerlm(sys.argv[1:])
  elif command == "export":
    from jalign.export import main as export
    export(sys.argv[1:])
  elif command == "report":
    from jalign.report import main as report
    report(sys.argv[1:])
  elif command == "evaluate":
    from jalign.evaluate import main as evaluate
    evaluate(sys.argv[1:])
  elif command == "score":
    from jalign.score import main as score
    score(sys.argv[1:])
  else:
    from jalign.demo import main as demo
    demo(sys.argv[1:])
