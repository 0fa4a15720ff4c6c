"""`python -m benchmarks.wan` (as root): the WAN benchmark; see benchmarks/wan/suite.py."""

from benchmarks.wan.suite import main

raise SystemExit(main())
