"""FlexMix-mini: a small real corpus (public prose + code, math, legal) built on any machine.

See build.py for the command and domains.py / math_problems.py for where each domain's text
comes from.
"""
