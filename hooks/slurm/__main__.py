"""`python -m vtorque.hooks.slurm prolog|epilog` (the shell entry points prolog_slurmctld, epilog_slurmctld in
this folder)."""

import sys

from . import main

sys.exit(main())
