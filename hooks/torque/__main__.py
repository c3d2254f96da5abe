"""`python -m vtorque.hooks.torque prologue|epilogue ARGS...` (the shell entry points) and `watch-cancel ...`
(the cancel watcher the prologue spawns)."""

import sys

from .entry import main

sys.exit(main())
