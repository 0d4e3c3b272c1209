"""`python -m masqd.daemon`: the same as the `masqd` command."""

from masqd.daemon.main import main

main()
