"""python -m apla.eval VIDEO ...: scores videos (apla.eval.score)."""
from apla.eval.score import main

raise SystemExit(main())
