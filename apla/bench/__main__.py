from apla.bench.core import main

raise SystemExit(main())
